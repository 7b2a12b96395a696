"""The worker process of the job table (``pruner.jobs.queue``): claims queued jobs one at a time and runs each
through the same workflow the CLI runs (``pruner.jobs.workflows``), reporting progress and heartbeats; it starts
again on new code when the package changed under it. ``python -m pruner jobs worker`` runs one; ``ensure_workers``
starts them."""

from __future__ import annotations

import os
import threading
import time
import traceback
from pathlib import Path

from pruner.jobs.queue import HEARTBEAT_S, IDLE_EXIT_S, POLL_S, STARTING_PHASE, Job, JobStore


def _execute(store: JobStore, job: Job, cache_dir: Path | None) -> dict:
    """Run the job's request through the same workflow the CLI runs, reporting to the job table."""
    from pruner.jobs.workflows import Context, run
    from pruner.model.loading import resolve_device

    request = job.request
    pid = os.getpid()
    # what the job shows until its first phase reports (the CLI, running the same workflow, shows its own bars)
    store.progress(job.id, STARTING_PHASE, 0, 1, pid=pid)
    ctx = Context(cache_dir=cache_dir,
                  progress=lambda phase, done, total: store.progress(job.id, phase, done, total, pid=pid),
                  should_cancel=lambda: store.cancel_requested(job.id), device=str(resolve_device("auto")))
    return run(request, ctx)


def code_fingerprint() -> tuple[int, int, int]:
    """What the worker's code is, cheaply: (files, newest modification time in ns, total bytes) of this package's
    Python files."""
    stats = [f.stat() for f in Path(__file__).resolve().parents[1].rglob("*.py")]
    return len(stats), max((st.st_mtime_ns for st in stats), default=0), sum(st.st_size for st in stats)


def worker_main(db_path: Path, cache_dir: Path | None = None, idle_exit_s: float = IDLE_EXIT_S) -> bool:
    """Claim and run jobs until none has been queued for ``idle_exit_s`` seconds. Returns True when it stopped
    because the package's code changed since it started (checked before each claim): the caller then runs a fresh
    worker (``pruner jobs worker`` replaces its process, keeping its pid and so its place in the worker table).
    A worker that went on would run the next job with the modules it imported before the change and import the
    others from the new code: a job that mixes two versions (or fails on a name one of them lacks)."""
    from pruner.engine.calibrate import Cancelled

    store = JobStore(db_path)
    pid = os.getpid()
    current: dict = {"job": None}
    stop = threading.Event()
    code = code_fingerprint()
    changed = False

    def heartbeat():
        while not stop.wait(HEARTBEAT_S):
            store.beat(pid, current["job"])

    store.beat(pid, None)
    threading.Thread(target=heartbeat, daemon=True).start()
    idle_since = time.time()
    try:
        while time.time() - idle_since < idle_exit_s:
            if code_fingerprint() != code:
                changed = True
                break
            job = store.claim(pid)
            if job is None:
                time.sleep(POLL_S)
                continue
            current["job"] = job.id
            try:
                result = _execute(store, job, cache_dir)
                store.finish(job.id, "done", result=result, pid=pid)
            except Cancelled as err:
                store.finish(job.id, "cancelled", error=str(err), pid=pid)
            except Exception as err:  # the job fails with its cause; the worker goes on with the next job
                store.finish(job.id, "failed", error=f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}",
                             pid=pid)
            current["job"] = None
            idle_since = time.time()
    finally:
        stop.set()
        if not changed:  # a worker replaced by a fresh one keeps its pid, and its row
            store.remove_worker(pid)
    return changed
