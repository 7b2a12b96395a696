"""The Ray executor: a sweep's jobs as Ray tasks on an existing cluster, reported to the local job table.

Ray is optional (``pip install -e '.[ray]'``); without it, ``RayExecutor`` refuses with what to install and the
local executor (``pruner.jobs.sweep.LocalExecutor``) works as before.

**How it runs.** ``RayExecutor.submit`` writes the sweep's jobs into the job table (executor "ray", so local
workers leave them alone) and starts a *driver* process (``pruner jobs ray-driver``) on this machine, detached like
a local worker. The driver connects to the cluster and runs the jobs stage by stage (statistics, then learned
allocations, then the cells: each shared input is computed once, before the cells that read it). Each job is one
Ray task that asks for what it needs: ``cpus_per_cell`` CPUs (its torch threads), one GPU when the spec says cuda
(or auto on a cluster that has GPUs), and the memory of the pre-flight estimate (``pruner.engine.memory_plan``). A task
lost with its worker process is retried (``max_retries``), then marked failed with Ray's cause.

**Progress and cancel.** Tasks send their phase progress to a small Ray actor; the driver copies it into the job
table every ``POLL_S`` and beats the jobs' heartbeats, so the dashboard shows a Ray sweep like a local one (plus
the node and process of each cell, ``Job.remote``). Cancelling a job sets a flag the task checks between blocks
(as local jobs do) and cancels it in Ray if it has not started. If the driver dies, ``reap`` fails its jobs.

**Where results land.** Either the cache folder is storage every node sees (the driver writes a token into it and a
task that reads the token back works in it directly; runs appear through the same atomic rename as local ones), or
a task works in a node-local cache (``node_cache``), receives the earlier stages' outputs (statistics, learned
allocations) through Ray's object store, and returns its output folder as an archive that the driver unpacks into
its own store atomically. Either way no half-written run is visible: a killed task leaves at most a hidden
temporary folder, which the driver removes when Ray reports the loss.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from pruner.store.files import PROJECT_ROOT, atomic_dir, writer_gone_here
from pruner.store.layout import CacheLayout

#: What to install for the Ray executor.
RAY_MISSING = ("the Ray executor needs Ray, which is not installed here: pip install -e '.[ray]' "
               "(or pip install 'ray>=2.40'); without it, leave the Ray address empty to run locally")
#: How often the driver copies progress into the job table and looks for cancel requests (seconds).
POLL_S = 0.5
#: The file a driver writes into its cache folder so that tasks can tell whether they see the same folder.
SHARED_TOKEN_FILE = ".ray-shared-token"
#: Where tasks keep their cache on nodes that do not see the driver's cache folder (unless ``node_cache`` says).
DEFAULT_NODE_CACHE = "~/.cache/pruner-ray"
#: Job kinds whose outputs later stages read (sent to nodes without the shared cache through the object store).
SHARED_KINDS = ("stats", "learn", "predictor")
#: How long the driver waits for the cluster to answer before it fails the jobs (seconds).
CONNECT_TIMEOUT_S = 60.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: A task lost with its worker process is run again this many times before the job fails.
DEFAULT_MAX_RETRIES = 2
#: Environment of a local head and of everything that talks to it: no usage statistics, and a loopback address stays
#: loopback (otherwise Ray rewrites 127.0.0.1 to the machine's network address).
LOCAL_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def start_local_head(cpus: int, *, lifetime_s: float = 3600, temp_dir: Path | None = None,
                     start_timeout_s: float = 60) -> tuple[subprocess.Popen, str]:
    """Start a Ray head on 127.0.0.1 only (``cpus`` CPUs, no dashboard, no usage statistics) that stops by itself
    after ``lifetime_s`` even if its caller dies; return (process, address). The process leads its own process
    group: ``os.killpg(proc.pid, SIGKILL)`` stops the head and its workers. Sets ``LOCAL_RAY_ENV`` in this process
    too, for the drivers it will start. For tests, benches and trying the Ray executor on one machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen(["timeout", str(int(lifetime_s)), str(ray), "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(cpus),
                             "--include-dashboard", "false", "--disable-usage-stats",
                             *(["--temp-dir", str(temp_dir)] if temp_dir is not None else [])],
                            env={**os.environ, **LOCAL_RAY_ENV}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + start_timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                raise RuntimeError(f"the local Ray head did not start within {start_timeout_s:g} s ({ray})")
            time.sleep(0.2)
    os.environ.update(LOCAL_RAY_ENV)
    return proc, f"127.0.0.1:{port}"


def require_ray():
    try:
        import ray
    except ImportError as err:
        raise ValueError(RAY_MISSING) from err
    return ray


@dataclass(frozen=True)
class RaySettings:
    """``address``: the cluster's address (host:port of its head, or "auto" on a cluster node). ``cpus_per_cell``:
    CPUs each task asks for and uses as torch threads. ``shared_cache``: whether nodes see this cache folder (None:
    find out per task). ``node_cache``: the cache folder on nodes that do not."""

    address: str
    cpus_per_cell: int = 1
    max_retries: int = DEFAULT_MAX_RETRIES
    shared_cache: bool | None = None
    node_cache: str | None = None

    def __post_init__(self):
        if not (isinstance(self.address, str) and self.address.strip()):
            raise ValueError("the Ray address must be host:port of the cluster's head (or 'auto' on a cluster node)")
        if not (isinstance(self.cpus_per_cell, int) and self.cpus_per_cell >= 1):
            raise ValueError(f"CPUs per cell must be an integer ≥ 1; got {self.cpus_per_cell!r}")
        if not (isinstance(self.max_retries, int) and self.max_retries >= 0):
            raise ValueError(f"retries must be an integer ≥ 0; got {self.max_retries!r}")


class RayExecutor:
    name = "ray"

    def __init__(self, settings: RaySettings):
        require_ray()  # before anything is queued
        self.settings = settings

    def submit(self, store, sweep, cache_dir: Path | None = None) -> list[int]:
        return submit_jobs(store, sweep.jobs(cache_dir), self.settings, cache_dir)


def submit_jobs(store, requests: list, settings: RaySettings, cache_dir: Path | None = None) -> list[int]:
    """Queue ``requests`` for Ray and start their driver process; returns the job ids."""
    require_ray()
    ids = [store.add(r.kind, r.to_dict(), r.label(), executor="ray") for r in requests]
    cmd = [sys.executable, "-m", "pruner", "jobs", "ray-driver", "--db", str(store.path),
           "--ids", ",".join(map(str, ids)), "--ray-settings", json.dumps(dataclasses.asdict(settings))]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    log = open(CacheLayout(store.path.parent).ray_driver_log, "ab")
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    store.hand_to(ids, proc.pid)
    return ids


# ---------------------------------------------------------------------------------------------------------------
# What a task sends and returns


def _pack(root: Path, relative: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(root / relative, arcname=".")
    return buf.getvalue()


def _unpack(data: bytes, target: Path) -> None:
    """Into ``target`` in one rename (replacing what was there)."""
    with atomic_dir(target) as tmp, tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp, filter="data")


def _outputs(kind: str, request, result: dict, layout: CacheLayout) -> list[Path]:
    """The cache folders a finished job wrote, relative to the cache root."""
    if kind == "stats":
        folders = [layout.stats(request.spec.key())]
    elif kind == "learn":
        folders = [layout.learned(result["learned_key"])]
    elif kind in ("prune", "eval", "recover"):
        folders = [layout.run(result["run"])]
    elif kind == "predictor":
        folders = [layout.predictor(result["predictor_key"])]
    else:
        folders = []
    return [f.relative_to(layout.root) for f in folders]


def remove_stale_temporaries(cache_dir: Path | None, gone) -> list[Path]:
    """The hidden temporary folders that dead processes left in the cache (``atomic_dir`` names them
    ``.NAME.tmp-PID-UUID-HOST``, at the root or one level down), removed; ``gone(pid, host)`` says whether that
    writer is dead (host None: a folder from before hosts were recorded). A cache may be shared between nodes, where
    the same pid can be a live writer on another machine: ``gone`` must look at the host too. Returns them."""
    import shutil

    from pruner.store.files import temporary_writer

    root = CacheLayout.at(cache_dir).root
    removed = []
    for parent in [root] + [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []:
        for tmp in parent.glob(".*.tmp-*"):
            writer = temporary_writer(tmp.name)
            if writer is not None and gone(*writer):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
    return removed


def lost_attempt(start: dict):
    """``gone`` for ``remove_stale_temporaries``: the writer of a lost task attempt (its pid on its host)."""
    return lambda pid, host: pid == start["pid"] and host in (None, start.get("host"))


def _task(kind: str, payload: dict, job_id: int, cache_dir: str | None, token: str | None, settings: dict,
          sink, inputs: list) -> dict:
    """One job on a Ray worker (the body of the remote function)."""
    import ray

    from pruner.store.files import writer_host

    pid, node, host = os.getpid(), ray.util.get_node_ip_address(), writer_host()
    # No ray.get on the sink in here: a task blocked in ray.get lends its CPUs back to Ray, which then starts more
    # tasks than the node has CPUs for. Calls from one task to one actor run in the order they were made.
    sink.started.remote(job_id, node, pid, host)
    shared = settings["shared_cache"]
    if shared is None:
        try:
            shared = cache_dir is not None and (Path(cache_dir) / SHARED_TOKEN_FILE).read_text() == token
        except OSError:
            shared = False
    here = Path(cache_dir) if shared else Path(os.path.expanduser(settings["node_cache"] or DEFAULT_NODE_CACHE))
    if not shared:  # this node's own killed tasks (a node cache in a home folder may be seen by other nodes too)
        remove_stale_temporaries(here, writer_gone_here)
        for relative, data in inputs:  # the earlier stages' outputs, through the object store
            _unpack(ray.get(data) if isinstance(data, ray.ObjectRef) else data, here / relative)

    import torch

    from pruner.jobs.workflows import Context, request_from_dict, run
    from pruner.model.loading import resolve_device

    torch.set_num_threads(settings["cpus_per_cell"])
    request = request_from_dict(kind, payload)
    last = {"t": 0.0}

    def progress(phase, done, total):
        now = time.monotonic()
        if now - last["t"] >= POLL_S / 2 or done == total:  # at most a few reports a second
            last["t"] = now
            sink.report.remote(job_id, phase, done, total)

    asked = {"ref": None, "cancelled": False}

    def should_cancel() -> bool:
        """The sink's answer to the previous check (one block late), without waiting for it."""
        if asked["ref"] is not None:
            ready, _ = ray.wait([asked["ref"]], timeout=0)
            if not ready:
                return asked["cancelled"]
            asked["cancelled"] = bool(ray.get(asked["ref"]))
        asked["ref"] = sink.is_cancelled.remote(job_id)
        return asked["cancelled"]

    ctx = Context(cache_dir=here, progress=progress, should_cancel=should_cancel, device=str(resolve_device("auto")))
    result = run(request, ctx)
    outputs = [] if shared else [(str(rel), _pack(here, rel)) for rel in _outputs(kind, request, result,
                                                                                    CacheLayout.at(here))]
    return {"result": result, "outputs": outputs, "shared": shared, "node": node, "pid": pid}


class _Sink:
    """The driver's mailbox on the cluster: tasks report start and progress; the driver drains and sets cancels."""

    def __init__(self):
        self.updates, self.cancelled, self.attempts = [], set(), {}

    def started(self, job_id, node, pid, host):
        self.attempts[job_id] = self.attempts.get(job_id, 0) + 1
        self.updates.append(("start", job_id, {"node": node, "pid": pid, "host": host,
                                               "attempt": self.attempts[job_id]}))

    def report(self, job_id, phase, done, total):
        self.updates.append(("progress", job_id, (phase, done, total)))

    def drain(self):
        out, self.updates = self.updates, []
        return out

    def cancel(self, job_id):
        self.cancelled.add(job_id)

    def is_cancelled(self, job_id):
        return job_id in self.cancelled


# ---------------------------------------------------------------------------------------------------------------
# The driver


def _resources(request, settings: RaySettings, cluster: dict, largest_memory: float,
               cache_dir: Path | None) -> dict:
    """Ray task options for one job; ValueError when no node can hold it."""
    from pruner.engine.memory_plan import gib

    options = {"num_cpus": settings.cpus_per_cell, "max_retries": settings.max_retries, "retry_exceptions": False}
    spec = getattr(request, "spec", None)
    model = getattr(spec, "model", None) or getattr(getattr(spec, "stats", None), "model", None)
    device = getattr(model, "device", "cpu")
    if device == "cuda" or (device == "auto" and cluster.get("GPU", 0) >= 1):
        if cluster.get("GPU", 0) < 1:
            raise ValueError("the spec asks for cuda, and no node of the Ray cluster has a GPU")
        options["num_gpus"] = 1
    if request.kind == "prune":
        try:
            from pruner.engine.memory_plan import plan_for_spec

            plan = plan_for_spec(spec, cache_dir, batch_size=request.batch_size, streamed=request.stream)
        except Exception:  # a config that cannot be read here (a hub model offline): no memory request
            plan = None
        if plan is not None:
            if largest_memory and plan.total > largest_memory:
                raise ValueError(f"the memory estimate of this cell, {gib(plan.total)}, is more than the largest Ray "
                                 f"node offers ({gib(largest_memory)}); stream it, or add a larger node")
            options["memory"] = int(plan.total)
    return options


def _cause(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def drive(db_path: Path, job_ids: list[int], settings: RaySettings, cache_dir: Path | None = None) -> None:
    """Run the jobs on the Ray cluster, stage by stage, reporting to the job table (the driver process's main)."""
    from pruner.engine.calibrate import Cancelled
    from pruner.jobs.queue import FINAL_STATES, STAGES, JobStore

    store = JobStore(db_path)
    active = set(job_ids)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(1.0):
            store.beat_jobs(sorted(active))

    threading.Thread(target=heartbeat, daemon=True).start()
    connected = threading.Event()

    def give_up(why: str):
        for i in job_ids:
            store.finish(i, "failed", error=f"could not connect to the Ray cluster at {settings.address}: {why}")
        stop.set()

    def watchdog():  # ray.init retries an unreachable address for ever
        if not connected.wait(CONNECT_TIMEOUT_S):
            give_up(f"no answer within {CONNECT_TIMEOUT_S:.0f} s (is the head running, and is its port reachable?)")
            os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if settings.address.rsplit(":", 1)[0].strip("[]") in LOOPBACK:
            # Ray otherwise rewrites a loopback address to this machine's network address, where a head started
            # for local use only (bound to 127.0.0.1) does not listen (read when Ray is imported)
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray = require_ray()
        ray.init(address=settings.address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
        connected.set()
    except Exception as err:
        connected.set()
        give_up(_cause(err))
        return
    from ray.exceptions import RayTaskError, TaskCancelledError

    layout = CacheLayout.at(cache_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    (layout.root / SHARED_TOKEN_FILE).write_text(token)
    cluster = ray.cluster_resources()
    largest_memory = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    sink = ray.remote(_Sink).options(num_cpus=0).remote()
    task = ray.remote(_task)
    shipped: list = []  # (relative folder, object ref) of every finished output, for nodes without the cache
    starts: dict[int, dict] = {}  # each job's latest attempt: node, pid, host

    def finish(job_id, state, **kw):
        store.finish(job_id, state, **kw)
        active.discard(job_id)

    def apply_updates():
        for what, job_id, value in ray.get(sink.drain.remote()):
            if what == "start":
                if job_id in starts and value["attempt"] > 1:  # a retry: the lost attempt's leftovers go
                    remove_stale_temporaries(cache_dir, lost_attempt(starts[job_id]))
                starts[job_id] = value
                store.set_remote(job_id, value)
                store.progress(job_id, f"on {value['node']}" + (f", attempt {value['attempt']}"
                                                                  if value["attempt"] > 1 else ""), 0, 0)
            else:
                store.progress(job_id, *value)

    try:
        jobs = [store.get(i) for i in job_ids]
        for stage in STAGES + ("other",):
            running = {}
            for job in jobs:
                if (job.kind if job.kind in STAGES else "other") != stage:
                    continue
                now = store.get(job.id)
                if now.state in FINAL_STATES:
                    active.discard(job.id)
                    continue
                if now.cancel_requested:  # cancelled while an earlier stage ran
                    finish(job.id, "cancelled", error="cancelled before it started")
                    continue
                try:
                    options = _resources(job.request, settings, cluster, largest_memory, cache_dir)
                except ValueError as err:
                    finish(job.id, "failed", error=str(err))
                    continue
                ref = task.options(**options).remote(job.kind, job.payload, job.id, str(layout.root.resolve()), token,
                                                     dataclasses.asdict(settings), sink, list(shipped))
                running[ref] = job
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                apply_updates()
                for ref, job in list(running.items()):
                    if ref not in ready and store.cancel_requested(job.id):
                        ray.get(sink.cancel.remote(job.id))
                        if job.id not in starts:  # not started yet: Ray drops it
                            ray.cancel(ref)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        out = ray.get(ref)
                    except TaskCancelledError:
                        finish(job.id, "cancelled", error="cancelled before it started")
                        continue
                    except RayTaskError as err:
                        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
                        if isinstance(cause, Cancelled):
                            finish(job.id, "cancelled", error=str(cause))
                        else:
                            finish(job.id, "failed", error=f"{_cause(cause)}\n{err}"[:4000])
                        continue
                    except Exception as err:  # the worker died more times than retries allow, a lost node, ...
                        if job.id in starts:
                            remove_stale_temporaries(cache_dir, lost_attempt(starts[job.id]))
                        finish(job.id, "failed", error=f"the Ray task was lost: {_cause(err)} (after "
                                                       f"{settings.max_retries} retries)")
                        continue
                    for relative, data in out["outputs"]:  # a node without the shared cache sent its folder
                        _unpack(data, layout.root / relative)
                        if job.kind in SHARED_KINDS:  # what later stages read; runs are not sent on
                            shipped.append((relative, ray.put(data)))
                    result = dict(out["result"])
                    result["executor"] = {"name": "ray", "node": out["node"], "pid": out["pid"],
                                          "shared_cache": out["shared"]}
                    if "folder" in result and not out["shared"]:
                        result["folder"] = str(layout.run(result["run"]))
                    finish(job.id, "done", result=result)
    except BaseException as err:
        for i in sorted(active):
            finish(i, "failed", error=f"the Ray driver stopped: {_cause(err)}\n{traceback.format_exc(limit=3)}")
        raise
    finally:
        stop.set()
        try:
            ray.shutdown()
        except Exception:
            pass
