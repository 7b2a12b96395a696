import sys

from pruner.cli import main

sys.exit(main())
