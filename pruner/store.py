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
import os
import shutil
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
