"""The cache folder: layout and atomic writes.

Layout (all under the cache directory, ``<project>/cache`` unless a caller passes another)::

    models/<bundled-name>/     converted bundled models (safetensors + config + tokenizer)
    stats/<key>/               outlier statistics of a dense model on a calibration set
    runs/<key>/                pruned models and their manifests (later issues)

Every folder is written through :func:`atomic_dir`: it is built under a temporary name and renamed into place
only when complete, so an interrupted write never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_cache_dir() -> Path:
    """``<project>/cache``."""
    return PROJECT_ROOT / "cache"


def default_data_dir() -> Path:
    """``<project>/../shared/data``: where the offline copies of the datasets live on this project's machines."""
    return PROJECT_ROOT.parent / "shared" / "data"


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a fresh temporary folder next to ``target``; on success it replaces ``target`` in one rename.

    On an exception the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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


def runs_dir(cache_dir: Path | None = None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "runs"


MANIFEST = "manifest.json"


def run_dir(key: str, cache_dir: Path | None = None) -> Path:
    return runs_dir(cache_dir) / key


def run_exists(key: str, cache_dir: Path | None = None) -> bool:
    return (run_dir(key, cache_dir) / MANIFEST).is_file()


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


def add_metrics(folder: Path, name: str, metrics: dict) -> dict:
    """Add (or replace) ``manifest['metrics'][name]`` atomically; returns the new manifest."""
    manifest = read_manifest(folder)
    manifest.setdefault("metrics", {})[name] = metrics
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


def list_runs(cache_dir: Path | None = None) -> list[dict]:
    """Manifests of all complete runs, newest first."""
    root = runs_dir(cache_dir)
    if not root.is_dir():
        return []
    out = [read_manifest(p) for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()]
    return sorted(out, key=lambda m: m.get("created", ""), reverse=True)


def run_zip(folder: Path) -> Path:
    """A zip of a run folder (Hugging Face files + manifest.json) next to it, built once, atomically."""
    import zipfile

    folder = Path(folder)
    read_manifest(folder)
    target = folder.parent.parent / "exports" / f"{folder.name}.zip"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:  # safetensors barely compress
            for path in sorted(folder.rglob("*")):  # subfolders too (a LoRA run's adapters live in lora/)
                if path.is_file():
                    z.write(path, f"{folder.name}/{path.relative_to(folder)}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
