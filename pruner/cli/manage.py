"""Commands that look after the cache, the job table and the DeepSparse environment: `cache`, `jobs`, `deepsparse-env`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pruner.cli.common import BadInput, cache_arg
from pruner.jobs.queue import FINAL_STATES


def _drop_weights(layout, keys: list[str]) -> int:
    """``cache --drop-weights KEY ...``: keep each named run's manifest and metrics, remove its weight files."""
    from pruner.runs.manifest import drop_weights, read_run
    from pruner.store.layout import check_key

    folders = []
    for key in keys:  # every key checked before anything is removed
        folder = layout.run(check_key(key))
        if not (folder / "manifest.json").is_file():
            raise BadInput(f"--drop-weights takes keys of runs in {layout.root / 'runs'}; no run {key!r}")
        if not read_run(folder).metrics:
            raise BadInput(f"run {key} has no evaluation yet: dropping its weights would leave nothing; evaluate it "
                           "first (`eval --run KEY --ppl`)")
        folders.append(folder)
    freed = 0
    for folder in folders:
        n = drop_weights(folder)
        freed += n
        print(f"run {folder.name}: weights dropped ({n / 2**20:.1f} MiB); manifest and metrics kept")
    print(f"freed {freed / 2**30:.2f} GiB")
    return 0


def cmd_cache(args) -> int:
    """List the cache's entries per kind with sizes; remove stale ones (--stale) or named ones (--remove)."""
    from pruner.store.layout import KINDS, CacheLayout

    layout = CacheLayout.at(cache_arg(args))
    if args.drop_weights:
        return _drop_weights(layout, args.drop_weights)
    entries = layout.entries(contents=args.stale)  # a cleanup reads every run's weights against their checksums
    chosen = []
    if args.remove:
        by_name = {e.path.name.removesuffix(".zip"): e for e in entries
                   if e.kind in ("runs", "stats", "learned", "predictors")}
        for name in args.remove:
            if name in KINDS:
                chosen += [e for e in entries if e.kind == name]
            elif name in by_name:
                chosen.append(by_name[name])
                if by_name[name].kind == "runs":  # its zip goes with it
                    chosen += [e for e in entries if e.kind == "exports" and e.path.stem == name]
            else:
                raise BadInput(f"--remove takes a kind ({', '.join(KINDS)}) or the key of a run, statistics, "
                               f"learned allocation or damage table in {layout.root}; got {name!r}")
    if args.stale:
        chosen += [e for e in entries if e.stale]
    if chosen:
        freed = layout.remove(sorted({e.path for e in chosen}))
        for e in chosen:
            print(f"removed {e.kind}/{e.path.name} ({e.bytes / 2**20:.1f} MiB){': ' + e.stale if e.stale else ''}")
        print(f"freed {freed / 2**30:.2f} GiB")
        return 0
    print(f"cache {layout.root}")
    print(f"{'kind':<10} {'entries':>7} {'size':>10} {'stale':>6} {'stale size':>11}  holds")
    for kind, what in KINDS.items():
        mine = [e for e in entries if e.kind == kind]
        stale = [e for e in mine if e.stale]
        print(f"{kind:<10} {len(mine):>7} {sum(e.bytes for e in mine) / 2**20:>8.1f} M {len(stale):>6} "
              f"{sum(e.bytes for e in stale) / 2**20:>9.1f} M  {what}")
    from pruner.runs.manifest import list_runs

    slim = [r for r in list_runs(layout.root).runs if r.weights_dropped]
    if slim:
        print(f"  {len(slim)} of the runs keep only their manifest and metrics (weights dropped after evaluation)")
    for e in entries:
        if e.stale:
            print(f"  stale: {e.kind}/{e.path.name}: {e.stale}")
    for other in layout.others():
        print(f"  not the cache's own (left alone): {other.name}")
    print("`python -m pruner cache --stale` removes the stale entries; `--remove KEY|KIND` removes named ones")
    return 0


def cmd_deepsparse_env(args) -> int:
    from pruner.evaluate.deepsparse_env import deepsparse_status, ensure_deepsparse_env

    if args.check:
        status = deepsparse_status()
        print("DeepSparse available" if status["available"] else f"DeepSparse not available: {status['reason']}")
        return 0 if status["available"] else 1
    try:
        ensure_deepsparse_env(print)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _warn_broken_runs(args) -> None:
    from pruner.runs.manifest import list_runs

    for key, why in list_runs(cache_arg(args)).broken:  # a job's output that can no longer be read
        print(f"warning: {why}")


def job_ids(words: list[str]) -> list[int]:
    """The job ids ``jobs`` was given: whole numbers and ranges A-B (both ends included), in order, each once."""
    ids: list[int] = []
    for word in words:
        low, dash, high = word.partition("-")
        if not (low.isdigit() and (high.isdigit() if dash else True)) or (dash and int(low) > int(high)):
            raise BadInput(f"job ids are whole numbers or ranges such as 52-62 (low end first); got {word!r}")
        ids += [i for i in range(int(low), int(high if dash else low) + 1) if i not in ids]
    return ids


def _cancel(store, ids: list[int]) -> None:
    """Cancel every job of ``ids`` (all checked to exist first: none is cancelled if one is missing) and the jobs
    that wait for their results; one line per job asked for."""
    missing = [i for i in ids if not store.exists(i)]
    if missing:
        raise BadInput(f"no job {', '.join(map(str, missing))} in {store.path} (`jobs list` shows the ids); "
                       "nothing was cancelled")
    for job_id in ids:
        job, along = store.cancel(job_id)
        print(f"job {job.id}: {job.state}{' (cancel requested)' if job.cancel_requested else ''}")
        along = [i for i in along if i not in ids]
        if along:
            print(f"cancelled with it, as they wait for its result: job{'s' if len(along) > 1 else ''} "
                  f"{', '.join(map(str, along))}")


def cmd_jobs(args) -> int:
    from pruner.jobs.queue import JobStore, default_db, ensure_workers
    from pruner.jobs.worker import worker_main

    ids = job_ids(args.id)
    if args.action in ("list", "wait") and len(ids) > 1:
        raise BadInput(f"jobs {args.action} takes one job id; got {len(ids)} (`jobs cancel` takes several, and ranges)")
    args.id = ids[0] if args.action != "cancel" and ids else None
    db = Path(args.db) if args.db else default_db(cache_arg(args))
    if args.action == "worker":
        if worker_main(db, cache_arg(args)):  # the code changed: the same worker again, on the new code
            print("the package's code changed since this worker started: it starts again on the new code",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, "-m", "pruner", *sys.argv[1:]])
        return 0
    if args.action == "ray-driver":
        from pruner.jobs.ray_exec import RaySettings, drive

        drive(db, [int(i) for i in args.ids.split(",")], RaySettings(**json.loads(args.ray_settings)), cache_arg(args))
        return 0
    if args.action in ("cancel", "wait") and not ids:
        raise BadInput(f"jobs {args.action} needs a job id (`jobs list` shows them)")
    if not db.is_file():  # nothing was ever queued here: say so, and create nothing
        if args.action in ("cancel", "wait"):
            raise BadInput(f"no job {', '.join(map(str, ids))}: {db} holds no job table (nothing was ever queued "
                           f"with this cache folder)")
        if args.json:
            print("[]")
            return 0
        print(f"no jobs: nothing was ever queued in {db.parent}")
        _warn_broken_runs(args)
        return 0
    store = JobStore(db)
    if args.action == "cancel":  # before a worker is started for jobs about to be cancelled
        store.reap()
        _cancel(store, ids)
    ensure_workers(store, cache_dir=cache_arg(args))  # reaps dead jobs; restarts a worker for queued ones
    if args.action == "cancel":
        return 0
    if args.action == "wait":
        import time

        while store.get(args.id).state not in FINAL_STATES:
            time.sleep(1)
            ensure_workers(store, cache_dir=cache_arg(args))  # a job whose worker died is queued again: run it
    jobs = [store.get(args.id)] if args.id is not None else store.list(args.limit)
    if args.json:
        print(json.dumps([{k: v for k, v in vars(j).items()} for j in jobs], indent=2, default=str))
        return 0
    print(f"{'id':>4}  {'state':<9} {'progress':<22} {'elapsed':>8}  job")
    for j in jobs:
        prog = f"{j.phase or ''} {j.done}/{j.total}" if j.total else ""
        elapsed = f"{j.elapsed:.0f} s" if j.elapsed is not None else ""
        where = (f" [Ray {j.remote['node']} pid {j.remote['pid']}]" if j.remote
                 else " [Ray]" if j.executor == "ray" else "")
        print(f"{j.id:>4}  {j.state:<9} {prog:<22} {elapsed:>8}  {j.label}{where}")
        if j.error and j.state == "failed":
            print(f"      error: {j.error.splitlines()[0]}")
    _warn_broken_runs(args)
    return 0


def add_parsers(sub) -> None:
    """Its commands' subparsers."""
    p = sub.add_parser("cache", help="sizes of the cache per kind; remove stale or named entries")
    p.add_argument("--stale", action="store_true",
                   help="remove stale entries (interrupted writes, old formats, zips of removed runs, ONNX graphs of "
                        "older export versions, and corrupt entries: files truncated, altered or saved under another "
                        "key)")
    p.add_argument("--remove", nargs="+", metavar="KEY|KIND",
                   help="remove these runs/statistics/learned allocations/damage tables (by key) or every entry of "
                        "these kinds")
    p.add_argument("--drop-weights", nargs="+", metavar="KEY",
                   help="keep these evaluated runs' manifests and metrics, remove their weights (a prune of the same "
                        "settings with --force restores them)")
    p.add_argument("--cache-dir", help="cache folder (default: $PRUNER_CACHE_DIR, else <project>/cache)")
    p.set_defaults(func=cmd_cache)


    p = sub.add_parser("deepsparse-env", help="create the DeepSparse virtual environment (.venv-deepsparse)")
    p.add_argument("--check", action="store_true", help="only say whether DeepSparse can run (exit 1 if not)")
    p.set_defaults(func=cmd_deepsparse_env)


    p = sub.add_parser("jobs", help="the background job table: list, wait for or cancel jobs")
    p.add_argument("action", choices=["list", "cancel", "wait", "worker", "ray-driver"])
    p.add_argument("id", nargs="*", help="a job id (cancel: several, or ranges such as 52-62: a sweep's jobs)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir", help="cache folder (default: $PRUNER_CACHE_DIR, else <project>/cache)")
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)  # ray-driver: the jobs it runs
    p.add_argument("--ray-settings", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_jobs)
