"""Writing into the cache: atomic folders and files, locked JSON updates, run zips. Where things go is
``pruner.store.layout.CacheLayout``'s business.

Every folder is written through :func:`atomic_dir`: it is built under a temporary name and renamed into place
only when complete, so an interrupted write never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Callable

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """``<project>/cache``."""
    return PROJECT_ROOT / "cache"


def default_data_dir() -> Path:
    """``<project>/../shared/data``: where the offline copies of the datasets live on this project's machines."""
    return PROJECT_ROOT.parent / "shared" / "data"


def writer_host() -> str:
    """This machine's name as temporary folders carry it (letters, digits, dots and dashes only)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "unknown"


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` of this machine is running (a zombie, exited but not yet reaped, is not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def writer_gone_here(pid: int, host: str | None) -> bool:
    """Whether a temporary folder's writer was a process of this machine that is no longer running (host None:
    a folder named before hosts were recorded, taken as this machine's). Another machine's writer is never
    declared gone from here: its pid means nothing on this one."""
    return host in (None, writer_host()) and not pid_alive(pid)


def temporary_writer(name: str) -> tuple[int, str | None] | None:
    """(pid, host) of the process that made temporary folder ``name`` (``.NAME.tmp-PID-UUID-HOST``; host None in
    folders made before hosts were recorded), or None when ``name`` is not such a folder. On a cache shared between
    machines a pid alone does not say whose folder it is."""
    if ".tmp-" not in name:
        return None
    parts = name.rsplit(".tmp-", 1)[1].split("-", 2)
    if not parts[0].isdigit():
        return None
    return int(parts[0]), (parts[2] if len(parts) == 3 else None)


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a fresh temporary folder next to ``target``; on success it replaces ``target`` in one rename.

    On an exception the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{writer_host()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


MANIFEST = "manifest.json"
#: Manifest entry of a run whose weight files were removed after its evaluations (``pruner.runs.manifest.drop_weights``):
#: when, and the bytes freed. The run still lists with its metrics; whatever needs the weights refuses, naming it.
WEIGHTS_DROPPED = "weights_dropped"


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no run at {folder} (missing {MANIFEST})")
    return json.loads(path.read_text())


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold an exclusive lock on ``folder`` (POSIX ``flock`` on the folder itself: no lock file to clean up, and the
    lock goes when the holder exits or dies). Every read-modify-write of a JSON file in the folder takes it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def exclusive(lock_path: Path, on_wait: Callable[[], None] | None = None):
    """Hold an exclusive ``flock`` on ``lock_path`` (released when the holder exits or dies). When another process
    holds it, ``on_wait()`` is called and this waits. Yields whether it had to wait. The lock file (and the folders
    made for it, when empty) is removed by its holder on the way out, so nothing stays behind; a waiter that then
    finds it gone or replaced takes the lock again on the file now there."""
    lock_path = Path(lock_path)
    created = [p for p in (lock_path.parent, *lock_path.parent.parents) if not p.exists()]  # removed again if empty
    waited = False
    while True:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # its folder was removed by the last holder between the two calls
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None and not waited:
                on_wait()
            waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder before us removed the file: lock the one there now
    try:
        yield waited
    finally:
        lock_path.unlink(missing_ok=True)
        for folder in [lock_path.parent, *created]:  # only when empty: the cache keeps what the work wrote
            with contextlib.suppress(OSError):
                folder.rmdir()
        os.close(fd)


def update_json_entry(path: Path, name: str, update: Callable[[dict | None], dict]) -> dict:
    """``payload[name] = update(payload.get(name))`` for the JSON object in ``path`` ({} when the file is missing),
    under the folder's lock and written atomically; returns the new payload.

    Two evaluations of one model that finish together (a zero-shot job and a speed job in two workers) each read,
    add their entry and write: without the lock the later write drops the other's entry.
    """
    path = Path(path)
    with folder_lock(path.parent):
        payload = json.loads(path.read_text()) if path.exists() else {}
        payload[name] = update(payload.get(name))
        write_json_atomic(path, payload)
    return payload


def update_metrics(folder: Path, name: str, update: Callable[[dict | None], dict]) -> dict:
    """``manifest['metrics'][name] = update(previous or None)``, under the run folder's lock; returns the manifest."""
    read_manifest(folder)  # a clear error for a folder that is not a run

    def with_metric(metrics: dict | None) -> dict:
        metrics = dict(metrics or {})
        metrics[name] = update(metrics.get(name))
        return metrics

    return update_json_entry(Path(folder) / MANIFEST, "metrics", with_metric)


def add_metrics(folder: Path, name: str, metrics: dict) -> dict:
    """Add (or replace) ``manifest['metrics'][name]`` atomically; returns the new manifest."""
    return update_metrics(folder, name, lambda _previous: metrics)


