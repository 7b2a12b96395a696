"""What every cache entry is keyed by and claims to be: the stable hash that names entries, each artifact's
format version (an entry of another version is stale, ``pruner.store.layout``), and the checksum a saved array
file is verified against when it is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def stable_hash(payload: dict, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable dict, independent of key order."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


#: Bump when pruning semantics or the run identity change (it is part of the run key).
#: 2: allocator and method parameters are declared per registry entry and stored as ``allocator_params`` /
#: ``method_params`` (format 1 had flat ``lam``, ``m``, ``beta``).
PRUNE_FORMAT_VERSION = 2


#: Part of a mixture-of-experts model's identity since its experts became prunable units (statistics and runs made
#: before left the experts out, so they must not be found under the new keys).
EXPERT_UNITS_VERSION = 1


#: Bump when the exported graphs change (part of the cached dense graphs' folder name and of every result).
EXPORT_VERSION = 6


#: Bump when the table's definition changes (part of the cache key). 2: the held-out windows run as one batch.
#: 3: the table also holds each layer's removed score energy (``predict_layers``).
TABLE_FORMAT = 3


#: Bump when the saved layout changes (it is part of the cache key).
STATS_FORMAT_VERSION = 3  # 2: per-layer PL_Alpha_Hill (AlphaPruning); 3: Σx² and scores in float64


#: meta.json fields that let a load verify what it reads: the stats.npz checksum and the statistics spec's key.
NPZ_SHA256, SPEC_KEY = "npz_sha256", "key"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verification_problem(folder: Path, meta: dict, key: str | None = None) -> str | None:
    """Why the statistics in ``folder`` (with its parsed ``meta``) are not what they claim, or None. Statistics
    written before checksums were kept pass on their format alone."""
    path = Path(folder) / "stats.npz"
    if not path.is_file():
        return "stats.npz is missing"
    if key is not None and meta.get(SPEC_KEY) not in (None, key):
        return f"they were saved for statistics key {meta[SPEC_KEY]}, not {key} (another model or calibration set)"
    if NPZ_SHA256 in meta and file_sha256(path) != meta[NPZ_SHA256]:
        return "stats.npz does not match its checksum (truncated or altered)"
    return None
