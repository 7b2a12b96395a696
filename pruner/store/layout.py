"""The one owner of the cache folder's layout: every path the package writes under it comes from ``CacheLayout``.

Layout (under ``<project>/cache`` unless ``$PRUNER_CACHE_DIR``, ``--cache-dir`` or a caller says otherwise)::

    models/<bundled-name>/          bundled models converted once to safetensors folders
    stats/<stats key>/              outlier statistics of a dense model on a calibration set
    learned/<learned key>/          learned allocations (BESA, search, …) per model, calibration set, S, parameters
    searches/<learned key>.json     an allocation search's last saved generation (it resumes from there)
    predictors/<predictor key>/     damage tables of the quality predictor (pruner.predictor.table)
    runs/<run key>/                 pruned (or LoRA-recovered) models with manifest.json
    exports/<run key>.zip           a run zipped for download (rebuilt when its manifest changes)
    dense/<model key>/metrics.json  the dense model's metrics (perplexity, zero-shot)
    dense/<model key>/onnx/v<export version>-b<B>-t<T>/   the dense model's exported ONNX graphs
    jobs.sqlite, worker.log,        the background job table, its workers' log and a Ray sweep's driver log
    ray-driver.log
    locks/<run key>.lock            taken by a prune while it makes its run: an identical prune waits for it

Anything else under the root (e.g. a benchmark's scratch folder) is listed as "other" and never touched by the
stale-entry cleanup. ``python -m pruner cache`` lists sizes per kind and removes what is stale or named.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pruner.store.files import WEIGHTS_DROPPED, default_cache_dir, temporary_writer, writer_gone_here
from pruner.store.formats import (EXPORT_VERSION, FILES_FIELD, PRUNE_FORMAT_VERSION, STATS_FORMAT_VERSION, TABLE_FORMAT,
                                  entry_problem, files_problem, verification_problem)

#: A cache key: the first 16 hex digits of a sha256 (``pruner.specs.stable_hash``).
KEY_PATTERN = re.compile(r"[0-9a-f]{16}")

#: The kinds of entries, in the order `pruner cache` lists them, with what each holds.
KINDS = {
    "models": "bundled models converted to safetensors",
    "stats": "outlier statistics (one per model × calibration set)",
    "learned": "learned allocations (BESA, predictor-optimal, search)",
    "searches": "allocation searches' last saved generations",
    "predictors": "damage tables of the perplexity predictor",
    "runs": "pruned and LoRA-recovered models",
    "exports": "runs zipped for download",
    "dense": "dense-model metrics and exported ONNX graphs",
    "jobs": "the background job table and worker log",
}


def check_key(key: str, what: str = "run key") -> str:
    """``key`` if it is a cache key (16 hex digits); otherwise ValueError. Keys become folder names, so anything
    else (``../../etc``, a path) is refused before it reaches the file system."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"{what} must be 16 hexadecimal digits (as `prune` prints them); got {key!r}")
    return key


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size); links are not followed; hard links count once."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    seen, total = set(), 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


@dataclass(frozen=True)
class Entry:
    """One removable thing in the cache."""

    kind: str
    path: Path
    bytes: int
    stale: str | None = None  # why it can go (None: it is in use)


@dataclass(frozen=True)
class CacheLayout:
    root: Path

    @classmethod
    def at(cls, cache_dir: Path | str | None = None) -> "CacheLayout":
        """The layout under ``cache_dir`` (None: ``<project>/cache``)."""
        return cls(Path(cache_dir) if cache_dir is not None else default_cache_dir())

    # -- where things are ------------------------------------------------------------------------------------
    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> Path:
        return self.models / name

    def stats(self, key: str) -> Path:
        return self.root / "stats" / check_key(key, "statistics key")

    def learned(self, key: str) -> Path:
        return self.root / "learned" / check_key(key, "learned-allocation key")

    def search(self, key: str) -> Path:
        """The last saved generation of a running (or interrupted) allocation search of learned-allocation ``key``."""
        return self.root / "searches" / f"{check_key(key, 'learned-allocation key')}.json"

    def predictor(self, key: str) -> Path:
        return self.root / "predictors" / check_key(key, "predictor key")

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run(self, key: str) -> Path:
        return self.runs / check_key(key)

    def export(self, key: str) -> Path:
        return self.run_zip(self.run(key))

    def run_zip(self, run_folder: Path) -> Path:
        """Where the download zip of a run folder under this cache goes (named after the folder)."""
        return self.root / "exports" / f"{Path(run_folder).name}.zip"

    def dense(self, model_key: str) -> Path:
        return self.root / "dense" / check_key(model_key, "model key")

    def dense_metrics(self, model_key: str) -> Path:
        return self.dense(model_key) / "metrics.json"

    def onnx(self, model_key: str, shape_key: str) -> Path:
        return self.dense(model_key) / "onnx" / shape_key

    @property
    def jobs_db(self) -> Path:
        return self.root / "jobs.sqlite"

    def lock(self, key: str) -> Path:
        """The lock file two processes making the same entry (a run of one spec) take in turn."""
        return self.root / "locks" / f"{check_key(key)}.lock"

    @property
    def worker_log(self) -> Path:
        """What the background workers print (next to the job table)."""
        return self.root / "worker.log"

    @property
    def ray_driver_log(self) -> Path:
        """What the Ray driver process of a sweep prints (next to the job table)."""
        return self.root / "ray-driver.log"

    # -- what is there ---------------------------------------------------------------------------------------
    def entries(self, contents: bool = False) -> list[Entry]:
        """Every entry of every kind with its size and, when it can go, why (see ``stale_reason``; ``contents``:
        runs' weight files are checked against their checksums, not only their sizes, which reads them all)."""
        out = []
        for kind, parent in (("models", self.models), ("stats", self.root / "stats"),
                             ("learned", self.root / "learned"), ("searches", self.root / "searches"),
                             ("predictors", self.root / "predictors"),
                             ("runs", self.runs)):
            for path in sorted(parent.iterdir()) if parent.is_dir() else []:
                out.append(Entry(kind, path, tree_bytes(path), self.stale_reason(kind, path, contents=contents)))
        exports = self.root / "exports"
        for path in sorted(exports.iterdir()) if exports.is_dir() else []:
            out.append(Entry("exports", path, tree_bytes(path), self.stale_reason("exports", path)))
        for model in sorted((self.root / "dense").iterdir()) if (self.root / "dense").is_dir() else []:
            for path in sorted((model / "onnx").iterdir()) if (model / "onnx").is_dir() else []:
                out.append(Entry("dense", path, tree_bytes(path), self.stale_reason("dense", path)))
            if (model / "metrics.json").is_file():
                out.append(Entry("dense", model / "metrics.json", tree_bytes(model / "metrics.json")))
        for path in (self.jobs_db, self.worker_log, self.ray_driver_log):
            if path.exists():
                out.append(Entry("jobs", path, tree_bytes(path)))
        return out

    def others(self) -> list[Path]:
        """Top-level things this layout does not own (never removed by ``remove_stale``)."""
        owned = {"models", "stats", "learned", "searches", "predictors", "runs", "exports", "dense", "jobs.sqlite",
                 "jobs.sqlite-wal", "jobs.sqlite-shm", "worker.log", "ray-driver.log", "locks", ".gitkeep"}
        return sorted(p for p in self.root.iterdir() if p.name not in owned) if self.root.is_dir() else []

    def stale_reason(self, kind: str, path: Path, contents: bool = False) -> str | None:
        """Why an entry is stale, or None. Stale: a temporary folder left by an interrupted write; statistics,
        learned allocations or runs whose format version the current code no longer reads; ONNX graphs of an
        older export version; and corrupt entries (files truncated, altered or saved under another key, against
        what their meta.json or manifest recorded; a run's weights by size, and by checksum with ``contents``)."""
        name = path.name
        if name.startswith(".") and ".tmp-" in name:
            writer = temporary_writer(name)
            # a folder still being written (its writer alive here, or on another machine sharing this cache) stays
            if writer is None or writer_gone_here(*writer):
                return "left by an interrupted write"
            return None
        if name.startswith(".") and ".old-" in name:
            return "left by an interrupted write"
        if kind == "exports":
            if not (self.runs / name.removesuffix(".zip") / "manifest.json").is_file():
                return "its run is gone"
            return None
        if kind == "dense":
            match = re.match(r"v(\d+)-", name)
            if match and int(match.group(1)) != EXPORT_VERSION:
                return f"ONNX export version {match.group(1)} (current {EXPORT_VERSION})"
            return None
        if kind == "stats":
            version = _json_field(path / "meta.json", "format")
            if version is not None and version != STATS_FORMAT_VERSION:
                return f"statistics format {version} (current {STATS_FORMAT_VERSION})"
            meta = _json_field(path / "meta.json", None)
            if not isinstance(meta, dict):
                return "unreadable meta.json"
            problem = verification_problem(path, meta, key=name)
            if problem:
                return f"corrupt: {problem}"
        if kind == "learned":
            if not (path / "learned.json").is_file():
                return "incomplete (no learned.json)"
            problem = entry_problem(path, key=name, required=("learned.json",))
            if problem:
                return f"corrupt: {problem}"
        if kind == "searches":
            if (self.root / "learned" / path.name.removesuffix(".json")).is_dir():
                return "its search finished (the learned allocation holds the result)"
            return None
        if kind == "predictors":
            version = _json_field(path / "meta.json", "format")
            if version is None:
                return "incomplete (no meta.json)"
            if version != TABLE_FORMAT:
                return f"damage table format {version} (current {TABLE_FORMAT})"
            problem = entry_problem(path, key=name, required=("table.npz",))
            if problem:
                return f"corrupt: {problem}"
        if kind == "runs":
            if not (path / "manifest.json").is_file():
                return "incomplete (no manifest.json)"
            spec = _json_field(path / "manifest.json", "spec")
            if not isinstance(spec, dict):
                return "unreadable manifest.json"
            version = spec.get("format", 1)
            if version != PRUNE_FORMAT_VERSION:
                return f"run format {version} (current {PRUNE_FORMAT_VERSION}; its key can no longer be asked for)"
            manifest = _json_field(path / "manifest.json", None)
            if WEIGHTS_DROPPED not in manifest:
                # by size unless asked (a listing must not read every run's gigabytes; a load checks the contents)
                problem = files_problem(path, manifest.get(FILES_FIELD, {}), contents=contents)
                if problem:
                    return f"corrupt: {problem}"
        return None

    def remove(self, paths: list[Path]) -> int:
        """Delete these entries (each must lie inside the cache); returns the bytes freed."""
        freed = 0
        root = self.root.resolve()
        for path in paths:
            path = Path(path)
            if root not in path.resolve().parents:
                raise ValueError(f"{path} is not inside the cache folder {root}")
            freed += tree_bytes(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return freed


def _json_field(path: Path, field: str | None):
    """One top-level field of a JSON file (None: the whole object); None when the file is missing or unreadable."""
    import json

    try:
        value = json.loads(path.read_text())
        return value if field is None else value.get(field)
    except (OSError, ValueError, AttributeError):
        return None


class CacheUnusable(Exception):
    """The cache folder cannot take what a command would write: it is a file, read-only, or its disk is too full.
    Raised before the work starts; an environment fault, not bad input."""


def check_writable(folder: Path, needs_bytes: int = 0, what: str = "the cache folder") -> None:
    """``CacheUnusable`` unless ``folder`` (created if missing, so its nearest existing parent counts) can be
    written and its disk has ``needs_bytes`` free. Nothing is created."""
    folder = Path(folder).expanduser()
    way = "choose another with --cache-dir or $PRUNER_CACHE_DIR"
    probe = folder
    while not probe.exists():
        if probe.is_symlink() or probe.parent == probe:
            raise CacheUnusable(f"{what} {folder} cannot be created ({probe} is a broken link); {way}")
        probe = probe.parent
    if not probe.is_dir():
        raise CacheUnusable(f"{what} {folder} cannot be used: {probe} is a file, not a folder; {way}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CacheUnusable(f"{what} {folder} cannot be written: {probe} is read-only for this user; {way}")
    free = shutil.disk_usage(probe).free
    if free < needs_bytes:
        raise CacheUnusable(f"{what} {folder} needs about {needs_bytes / 2**30:.2f} GiB free, its disk has "
                            f"{free / 2**30:.2f} GiB; free some (`python -m pruner cache --stale`, `cache --remove`, "
                            f"`cache --drop-weights`) or {way}")
