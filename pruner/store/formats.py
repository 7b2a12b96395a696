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


#: The field of an entry's meta (or a run's manifest) that records the files its data lives in:
#: {file name (relative to the entry's folder): {"bytes": size, "sha256": digest}}.
FILES_FIELD = "files_sha256"


class CorruptArtifact(ValueError):
    """A cache entry that is not what it claims to be (truncated, altered, or another key's). It is never used as it
    is: the message names it, what is wrong, and how to get a good one back (``remedy``)."""

    def __init__(self, what: str, folder: Path, problem: str, remedy: str | None = None):
        remedy = remedy or (f"remove it (`python -m pruner cache --remove {Path(folder).name}`) and it is computed "
                            "again")
        super().__init__(f"cached {what} {folder} cannot be used: {problem}. It is never used as it is: {remedy}")
        self.folder, self.problem = Path(folder), problem


def file_records(folder: Path, names) -> dict:
    """``FILES_FIELD``'s value for these files of ``folder`` (names relative to it)."""
    folder = Path(folder)
    return {str(n): {"bytes": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in sorted(names)}


def files_problem(folder: Path, records: dict, *, contents: bool = True) -> str | None:
    """Why the files of ``folder`` are not the ones ``records`` (``file_records``) describes, or None: one missing,
    of another size (truncated), or, with ``contents``, of other bytes (altered or another entry's file)."""
    folder = Path(folder)
    for name, record in sorted(records.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{name} is {size} bytes, {record['bytes']} were written (truncated or altered)"
        if contents and file_sha256(path) != record["sha256"]:
            return f"{name} does not match its checksum (altered, or another entry's file)"
    return None


def entry_problem(folder: Path, *, key: str | None = None, required: tuple[str, ...] = ()) -> str | None:
    """Why a cache entry folder is not what it claims, or None. Its ``meta.json`` records the key it was saved
    under (``"key"``) and its data files (``FILES_FIELD``); both are checked when present (entries written before
    they were recorded pass on their files' presence and readability alone). ``required``: files that must exist;
    the JSON ones among them must parse."""
    folder = Path(folder)
    for name in required:
        if not (folder / name).is_file():
            return f"{name} is missing"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as err:
            return f"meta.json is unreadable ({err})"
        if not isinstance(meta, dict):
            return "meta.json is not an object"
        if key is not None and meta.get("key") not in (None, key):
            return f"it was saved under key {meta['key']}, not {key} (another model, calibration set or setting)"
        problem = files_problem(folder, meta.get(FILES_FIELD, {}))
        if problem:
            return problem
    for name in required:
        if name.endswith(".json"):
            try:
                json.loads((folder / name).read_text())
            except ValueError as err:
                return f"{name} is unreadable ({err})"
    return None
