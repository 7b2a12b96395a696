"""``python -m pruner ...``: builds specs from argv and calls the same functions the dashboard calls.

Bad input ends with a one-line ``error: ...`` on stderr naming the allowed values, exit code 2, and nothing cached.
"""

from __future__ import annotations

import argparse
import errno
import sqlite3
import sys

from pruner.cli import analyse, evaluate, manage, prune
from pruner.cli.common import EXIT_BAD_INPUT, BadInput, Parser, cache_arg
from pruner.data import DataError
from pruner.store.formats import CorruptArtifact
from pruner.store.layout import CacheLayout, CacheUnusable, check_writable

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
#: Exit code of a command whose output's reader went away (``python -m pruner jobs list | head``): 128 + SIGPIPE, as
#: a shell reports a tool the signal stopped. Python ignores SIGPIPE, so the write raises BrokenPipeError instead.
EXIT_BROKEN_PIPE = 141
#: Exit code of a command the machine or the cache could not serve (not the user's input): a cache folder that is a
#: file, read-only or full, a corrupt cache entry, an operating-system error.
EXIT_ENVIRONMENT = 3
#: Commands that write into the cache folder; it is checked (a folder, writable) before they start.
WRITING_COMMANDS = ("model", "stats", "allocate", "predict", "prune", "recover", "sweep", "eval")


def _environment_fault(err: BaseException) -> str:
    """One line for an environment fault: what could not be done, where, and what to do."""
    if isinstance(err, (CacheUnusable, CorruptArtifact)):
        return str(err)
    if isinstance(err, sqlite3.Error):
        return f"the job table cannot be used ({err}); check that the cache folder is writable and its disk not full"
    where = f" {err.filename}" if getattr(err, "filename", None) else ""
    if getattr(err, "errno", None) == errno.ENOSPC:
        return (f"no space left on the disk of{where}; free some (`python -m pruner cache --stale`, `cache --remove`) "
                "or choose another cache folder (--cache-dir or $PRUNER_CACHE_DIR); nothing half-written was kept")
    if isinstance(err, PermissionError) or getattr(err, "errno", None) == errno.EROFS:
        return f"permission denied:{where} cannot be written; choose another cache folder (--cache-dir)"
    return f"{err.strerror or err}:{where}" if isinstance(err, OSError) else str(err)


def _discard_stdout() -> None:
    """Point the standard output's descriptor at the null device: its reader is gone, and the interpreter's last flush
    of what is still buffered would otherwise print "Exception ignored ... BrokenPipeError" on the way out."""
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a test's capture: nothing to flush at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


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
        if args.command in WRITING_COMMANDS:
            check_writable(CacheLayout.at(cache_arg(args)).root)
        return args.func(args)
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except (CacheUnusable, CorruptArtifact, OSError, sqlite3.Error) as err:
        print(f"error: {_environment_fault(err)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
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
