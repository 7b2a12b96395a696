"""Background jobs: a SQLite job table and worker processes that run typed requests (``pruner.jobs.workflows``).

* ``submit`` adds a queued job and makes sure a worker is running. Workers are separate processes started with
  ``start_new_session=True``, so they survive Streamlit reruns, a browser refresh and an app restart.
* A worker claims the oldest queued job in a write transaction (so two workers never take the same job),
  reports progress per block, and beats a heartbeat every ``HEARTBEAT_S`` seconds from a side thread.
* ``cancel`` sets a flag that the job checks between blocks (between chunks for perplexity); the job ends as
  ``cancelled`` and, because runs are written atomically, leaves no half-written run.
* ``reap`` marks a running job ``failed`` when its worker process is gone or its heartbeat is older than
  ``DEAD_AFTER_S``, with that cause as the error text.
* At most ``max_workers`` workers run at once (default 1: one job at a time); a worker (``pruner.jobs.worker``)
  exits after ``IDLE_EXIT_S`` seconds without work.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pruner.store.files import PROJECT_ROOT, pid_alive
from pruner.store.layout import CacheLayout

#: Seconds between heartbeats of a worker.
HEARTBEAT_S = 2.0
#: A running job whose worker has not beaten for this long is declared dead.
DEAD_AFTER_S = 30.0
#: A worker with nothing to do exits after this long.
IDLE_EXIT_S = 20.0
#: How often an idle worker looks for new jobs.
POLL_S = 0.5
#: How long opening the job table waits for other processes that hold it (seconds).
DB_BUSY_TIMEOUT_S = 30.0

STATES = ("queued", "running", "done", "failed", "cancelled")
EXECUTORS = ("local", "ray")
ACTIVE_STATES = ("queued", "running")  # a job in these states has not ended
FINAL_STATES = ("done", "failed", "cancelled")
#: The phase a job shows from its start until its work's first phase reports (loading the model, tokenizing, the
#: first block's inputs): it said "starting 0/0" for 10–18 s.
STARTING_PHASE = "loading the model and data"
#: Stage of each job kind within a sweep: a stage starts when the one before has finished.
STAGES = ("stats", "learn", "prune")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    label TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    phase TEXT,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    heartbeat REAL,
    worker_pid INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    executor TEXT NOT NULL DEFAULT 'local',
    remote TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    phase_started REAL
);
CREATE TABLE IF NOT EXISTS workers (pid INTEGER PRIMARY KEY, started REAL NOT NULL, heartbeat REAL NOT NULL);
"""


#: Columns added after the first release of the table: (name, declaration).
ADDED_COLUMNS = (("executor", "TEXT NOT NULL DEFAULT 'local'"), ("remote", "TEXT"),
                 ("attempts", "INTEGER NOT NULL DEFAULT 0"), ("phase_started", "REAL"))
#: How many times a local job is started before a dead worker fails it: a worker killed (out of memory, a reboot)
#: or stopped is the machine's fault, not the job's, so the job is queued again, as the Ray executor retries its
#: tasks (``pruner.jobs.ray_exec.DEFAULT_MAX_RETRIES`` = 2 retries, 3 attempts).
MAX_ATTEMPTS = 3


def default_db(cache_dir: Path | None = None) -> Path:
    return CacheLayout.at(cache_dir).jobs_db


@dataclass
class Job:
    id: int
    kind: str
    payload: dict
    label: str
    state: str
    phase: str | None
    done: int
    total: int
    created: float
    started: float | None
    finished: float | None
    heartbeat: float | None
    worker_pid: int | None
    cancel_requested: bool
    error: str | None
    result: dict | None
    #: who runs it: "local" (the worker processes here) or "ray" (a Ray driver process, ``pruner.jobs.ray_exec``)
    executor: str = "local"
    #: where a remote executor runs it: {"node", "pid", "attempt"} of the Ray worker (None for local jobs)
    remote: dict | None = None
    #: how many times a local worker has started it (``MAX_ATTEMPTS``)
    attempts: int = 0
    #: when the current phase first reported (its clock for the ETA)
    phase_started: float | None = None

    @property
    def request(self):
        """The typed request this job runs (``pruner.jobs.workflows``); ValueError for a payload this code cannot read
        (e.g. a job queued by an older version)."""
        from pruner.jobs.workflows import request_from_dict

        return request_from_dict(self.kind, self.payload)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else (1.0 if self.state == "done" else 0.0)

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    @property
    def eta(self) -> float | None:
        """Seconds left in the current phase, from its measured pace: the time since the phase first reported over
        the steps done since (None until a step is done). Loading the model and earlier phases are not counted: a
        statistics job's first seconds said 570–715 s for a pass that took 208 s."""
        if self.state != "running" or not self.done or not self.total or self.phase_started is None:
            return None
        return (time.time() - self.phase_started) / self.done * (self.total - self.done)


class JobStore:
    """The job table. Every method opens its own short connection, so it is safe across threads and processes."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else default_db()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._create()

    def _create(self) -> None:
        """Create the table and switch the file to WAL (a persistent setting). Switching needs a moment of exclusive
        access, and SQLite reports "database is locked" at once, without waiting, when another process opens the
        same new file at that moment (two app processes starting together), so that case is retried."""
        end = time.monotonic() + DB_BUSY_TIMEOUT_S
        while True:
            try:
                with self._db() as db:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(SCHEMA)
                    have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
                    for column, decl in ADDED_COLUMNS:  # a table made by an older version gains them
                        if column not in have:
                            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > end:
                    raise
                time.sleep(POLL_S / 5)

    @contextmanager
    def _db(self):
        db = sqlite3.connect(self.path, timeout=DB_BUSY_TIMEOUT_S, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    @staticmethod
    def _job(row) -> Job:
        d = dict(row)
        d["payload"] = json.loads(d["payload"])
        d["result"] = json.loads(d["result"]) if d["result"] else None
        d["remote"] = json.loads(d["remote"]) if d.get("remote") else None
        d["cancel_requested"] = bool(d["cancel_requested"])
        return Job(**d)

    # -- queries -------------------------------------------------------------------------------------------
    def get(self, job_id: int) -> Job:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise ValueError(f"no job {job_id}")
        return self._job(row)

    def list(self, limit: int = 100) -> list[Job]:
        """The running jobs first, then the newest ``limit`` of the others, newest first. A sweep queues its cells
        after the job that runs first (its learning or statistics): newest first alone put the one job at work
        below every queued cell, or off a short list."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'running' OR id IN "
                              "(SELECT id FROM jobs ORDER BY id DESC LIMIT ?) ORDER BY state = 'running' DESC, id DESC",
                              (limit,)).fetchall()
        return [self._job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state: running, queued, then the ended ones (states without a job left out)."""
        with self._db() as db:
            found = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        order = ("running", *(s for s in STATES if s != "running"))
        return {state: found[state] for state in order if found.get(state)}

    def alive_workers(self) -> list[int]:
        with self._db() as db:
            return self._alive_workers(db)

    @staticmethod
    def _alive_workers(db) -> list[int]:
        now = time.time()
        rows = db.execute("SELECT pid, heartbeat FROM workers").fetchall()
        dead = [r["pid"] for r in rows if not pid_alive(r["pid"]) or now - r["heartbeat"] > DEAD_AFTER_S]
        db.executemany("DELETE FROM workers WHERE pid = ?", [(p,) for p in dead])
        return [r["pid"] for r in rows if r["pid"] not in dead]

    @staticmethod
    def _register_worker(db, pid: int, now: float) -> None:
        """Insert the worker or refresh its heartbeat (keeping its start time)."""
        db.execute("INSERT OR REPLACE INTO workers (pid, started, heartbeat) VALUES "
                   "(?, COALESCE((SELECT started FROM workers WHERE pid = ?), ?), ?)", (pid, pid, now, now))

    @contextmanager
    def _write_lock(self):
        """A connection holding SQLite's write lock until the block ends (other writers wait; readers do not)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- changes -------------------------------------------------------------------------------------------
    def add(self, kind: str, payload: dict, label: str, executor: str = "local") -> int:
        """Queue a job; returns its id, or the id of the identical job (same kind, executor and payload) that is
        already queued or running."""
        from pruner.jobs.workflows import WORKFLOWS

        if kind not in WORKFLOWS:
            raise ValueError(f"job kind must be one of {', '.join(WORKFLOWS)}; got {kind!r}")
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
        text = json.dumps(payload, sort_keys=True)
        with self._write_lock() as db:
            # the same request queued again while it is queued or running (a second click, a second CLI call) is
            # the job already there, not a duplicate that would repeat the work
            for row in db.execute(f"SELECT id, payload FROM jobs WHERE kind = ? AND executor = ? AND state IN "
                                  f"({', '.join('?' * len(ACTIVE_STATES))}) ORDER BY id",
                                  (kind, executor, *ACTIVE_STATES)).fetchall():
                if json.dumps(json.loads(row["payload"]), sort_keys=True) == text:
                    return int(row["id"])
            cur = db.execute("INSERT INTO jobs (kind, payload, label, created, executor) VALUES (?, ?, ?, ?, ?)",
                             (kind, text, label, time.time(), executor))
            return int(cur.lastrowid)

    def hand_to(self, job_ids: list[int], pid: int) -> None:
        """Remote jobs: ``pid`` is the driver process that runs them (they count as running from now: the driver
        beats for them, and ``reap`` fails them if it dies)."""
        now = time.time()
        with self._db() as db:
            db.executemany("UPDATE jobs SET state = 'running', started = ?, heartbeat = ?, worker_pid = ?, "
                           "phase = 'waiting for a Ray worker' WHERE id = ? AND state = 'queued'",
                           [(now, now, pid, i) for i in job_ids])

    def set_remote(self, job_id: int, remote: dict) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET remote = ?, heartbeat = ? WHERE id = ?",
                       (json.dumps(remote), time.time(), job_id))

    def exists(self, job_id: int) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def cancel(self, job_id: int) -> tuple[Job, list[int]]:
        """Queued jobs are cancelled at once; running ones stop at their next check. The jobs that have not ended and
        wait for this one's results (``dependents``: a sweep's cells on their statistics or learned allocation) are
        cancelled with it; else the first of them would start the same work itself. Returns the job and the ids of
        those cancelled with it."""
        along = self.dependents(job_id)
        with self._db() as db:
            for i in [job_id, *along]:
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state = 'queued'",
                           (time.time(), i))
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (i,))
        return self.get(job_id), along

    def dependents(self, job_id: int) -> list[int]:
        """Ids of the jobs that have not ended and read, directly or through another such job, a result that job
        ``job_id`` writes (``Request.makes`` / ``Request.needs``); none while that job has ended (its results are
        written, or it wrote none). Jobs whose payload this code cannot read are left out."""
        def request(job):
            try:
                return job.request
            except ValueError:
                return None

        with self._db() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(ACTIVE_STATES))}) "
                              f"ORDER BY id", ACTIVE_STATES).fetchall()
        active = {j.id: request(j) for j in map(self._job, rows)}
        if active.get(job_id) is None:
            return []
        found, pending = [], [active.pop(job_id).makes()]
        while pending:
            made = pending.pop()
            for i, req in list(active.items()):
                if req is not None and req.needs() & made:
                    found.append(i)
                    pending.append(active.pop(i).makes())
        return sorted(found)

    def claim(self, pid: int) -> Job | None:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' AND executor = 'local' ORDER BY id "
                             "LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            now = time.time()
            db.execute("UPDATE jobs SET state = 'running', started = ?, heartbeat = ?, worker_pid = ?, "
                       "attempts = attempts + 1 WHERE id = ?", (now, now, pid, row["id"]))
            db.execute("COMMIT")
        return self.get(row["id"])

    def progress(self, job_id: int, phase: str, done: int, total: int, pid: int | None = None) -> None:
        """``pid``: the worker reporting; a worker whose job was taken from it (reaped, queued again) is ignored."""
        now = time.time()
        with self._db() as db:
            db.execute("UPDATE jobs SET phase_started = CASE WHEN phase IS ? AND phase_started IS NOT NULL "
                       "THEN phase_started ELSE ? END, phase = ?, done = ?, total = ?, heartbeat = ? WHERE id = ?"
                       + (" AND worker_pid = ?" if pid is not None else ""),
                       (phase, now, phase, done, total, now, job_id, *([pid] if pid is not None else [])))

    def beat(self, pid: int, job_id: int | None) -> None:
        now = time.time()
        with self._db() as db:
            self._register_worker(db, pid, now)
            if job_id is not None:
                db.execute("UPDATE jobs SET heartbeat = ? WHERE id = ? AND state = 'running'", (now, job_id))

    def beat_jobs(self, job_ids: list[int]) -> None:
        """A remote executor's driver: its running jobs are alive (it is not a local worker: not registered)."""
        now = time.time()
        with self._db() as db:
            db.executemany("UPDATE jobs SET heartbeat = ? WHERE id = ? AND state = 'running'",
                           [(now, i) for i in job_ids])

    def cancel_requested(self, job_id: int) -> bool:
        with self._db() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def finish(self, job_id: int, state: str, error: str | None = None, result: dict | None = None,
               pid: int | None = None) -> None:
        """Record a final state. A final state is final: a worker that was stopped long enough to be reaped as dead,
        then resumed, must not turn the "failed" the table already shows into "done". ``pid``: the worker
        reporting; one whose job was queued again meanwhile (and perhaps taken by another worker) is ignored."""
        if state not in FINAL_STATES:
            raise ValueError(f"final state must be one of {', '.join(FINAL_STATES)}; got {state!r}")
        with self._db() as db:
            db.execute(f"UPDATE jobs SET state = ?, finished = ?, error = ?, result = ? WHERE id = ? "
                       f"AND state NOT IN ({', '.join('?' * len(FINAL_STATES))})"
                       + (" AND worker_pid = ?" if pid is not None else ""),
                       (state, time.time(), error, json.dumps(result) if result is not None else None, job_id,
                        *FINAL_STATES, *([pid] if pid is not None else [])))

    def remove_worker(self, pid: int) -> None:
        with self._db() as db:
            db.execute("DELETE FROM workers WHERE pid = ?", (pid,))

    def reap(self) -> list[int]:
        """Running jobs whose worker died or stopped responding: a local one is queued again while it has attempts
        left (``MAX_ATTEMPTS``; the next ``ensure_workers`` starts a worker for it), then failed with the cause; a
        remote one is failed (its executor retries). Returns the ids of the jobs failed now."""
        now = time.time()
        failed = []
        with self._db() as db:
            rows = db.execute("SELECT id, worker_pid, heartbeat, executor, attempts FROM jobs "
                              "WHERE state = 'running'").fetchall()
            for r in rows:
                silent = now - (r["heartbeat"] or 0)
                if pid_alive(r["worker_pid"]) and silent <= DEAD_AFTER_S:
                    continue
                cause = (f"worker process {r['worker_pid']} died" if not pid_alive(r["worker_pid"])
                         else f"worker process {r['worker_pid']} stopped responding")
                cause += f" (last heartbeat {silent:.0f} s ago)"
                if r["executor"] == "local" and r["attempts"] < MAX_ATTEMPTS:
                    db.execute("UPDATE jobs SET state = 'queued', worker_pid = NULL, started = NULL, heartbeat = NULL, "
                               "phase = ?, done = 0, total = 0, error = ? WHERE id = ? AND state = 'running'",
                               (f"queued again after attempt {r['attempts']} of {MAX_ATTEMPTS}", cause, r["id"]))
                    continue
                tries = f" after {r['attempts']} attempts" if r["executor"] == "local" else ""
                db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ? "
                           "AND state = 'running'", (now, f"{cause}; the job did not finish{tries}", r["id"]))
                failed.append(r["id"])
        return failed


# ---------------------------------------------------------------------------------------------------------------
# Submitting and running


def submit(store: JobStore, request, *, cache_dir: Path | None = None, max_workers: int = 1,
           start_worker: bool = True) -> int:
    """Queue a typed request (``pruner.jobs.workflows``; it validated itself when built); start a worker if fewer than
    ``max_workers`` are alive."""
    job_id = store.add(request.kind, request.to_dict(), request.label())
    if start_worker:
        ensure_workers(store, cache_dir=cache_dir, max_workers=max_workers)
    return job_id


def ensure_workers(store: JobStore, *, cache_dir: Path | None = None, max_workers: int = 1) -> list[int]:
    """Reap dead jobs, and start workers while fewer than ``max_workers`` are alive and jobs are queued."""
    store.reap()
    started = []
    # Counting the live workers and registering new ones happen under one write lock: two processes submitting at
    # the same moment (two app sessions, two CLI calls) would otherwise both see no worker and both start one —
    # and two torch workers on a 2-core machine slow each other down many times over.
    with store._write_lock() as db:
        alive = store._alive_workers(db)
        queued = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND executor = 'local'").fetchone()[0]
        for _ in range(min(max_workers - len(alive), queued)):
            cmd = [sys.executable, "-m", "pruner", "jobs", "worker", "--db", str(store.path)]
            if cache_dir is not None:
                cmd += ["--cache-dir", str(cache_dir)]
            log = open(CacheLayout(store.path.parent).worker_log, "ab")
            proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            store._register_worker(db, proc.pid, time.time())  # registered at once: counted by the next caller
            started.append(proc.pid)
    return started
