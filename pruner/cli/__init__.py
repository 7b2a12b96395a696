"""``python -m pruner ...``: builds specs from argv and calls the same functions the dashboard calls.

Bad input ends with a one-line ``error: ...`` on stderr naming the allowed values, exit code 2, and nothing cached.
"""

from __future__ import annotations

import argparse
import sys

from pruner.cli import analyse, evaluate, manage, prune
from pruner.cli.common import EXIT_BAD_INPUT, BadInput, Parser
from pruner.data import DataError

#: One module per command group, each adding its own subparsers (``add_parsers``); the flags they share, the specs
#: built from them and the printers live in ``pruner.cli.common``.
COMMAND_GROUPS = (analyse, prune, evaluate, manage)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m pruner", description="Layerwise sparsity allocation for LLM pruning")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


#: Exit codes of a command stopped by Ctrl-C (SIGINT) or SIGTERM, as a shell reports them (128 + the signal).
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every ``finally`` (temporary folders, hooks) runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return args.func(args)
    except (BadInput, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was kept (completed results stay cached)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("terminated: nothing half-written was kept (completed results stay cached)", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The `pruner` console command (pyproject.toml)."""
    sys.exit(main())
