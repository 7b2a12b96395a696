"""Run a module (``-m name``) or a script under this interpreter and write the process's peak resident memory
(VmHWM from /proc, in KiB) to the file named by $HWM_FILE when it exits. Standard library only, so it runs in any
virtual environment: the peer bench launches both tools through it and reads the same measure for each."""

import atexit
import os
import runpy
import sys


def _write_peak() -> None:
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["HWM_FILE"], "w") as out:
        out.write(kib)


if __name__ == "__main__":
    atexit.register(_write_peak)
    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        sys.path[0] = os.getcwd()  # as `python -m` does: modules are found from the working directory
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
