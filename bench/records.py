"""A study's ledger: the runs behind a docs table, kept as records in a JSON-lines file under docs/.

A run's cache folder holds its weights and is not kept from one machine (or clone) to the next; a study of many
seeds and searches that each take an hour outlives it. ``bench.seed_study --records FILE`` writes each run of the
study it reports into FILE (its manifest with the metrics, never its weights) and reads FILE back the next time:
a run recorded there with the perplexity the study asks for is reported from its record, not pruned again.

One line per run: ``{"recorded": {"commit", "machine", "at"}, "manifest": the run's manifest.json}``, the manifest
without its per-layer table of achieved sparsities (``achieved.layers``: 37 of its 46 KB on SmolLM2; the per-block
and overall ones stay). ``commit`` is
the checkout the record was written from (the run itself was made by the code of that commit or of an earlier one
of the same cache: the manifest's ``created`` says when); a record is replaced when its run's metrics grew (e.g. a
full test-set perplexity added later), and keeps its place in the file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from pruner.runs.manifest import BadRun, RunManifest


@dataclass(frozen=True)
class Record:
    run: RunManifest
    recorded: dict  # {"commit", "machine", "at"}


def read_records(path: str | Path) -> dict[str, Record]:
    """The records in ``path`` by run key ({} when the file does not exist yet); ValueError naming the line of a
    record that cannot be read (the file is never guessed around)."""
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            record = Record(RunManifest.from_dict(entry["manifest"]), dict(entry["recorded"]))
        except (json.JSONDecodeError, KeyError, TypeError, BadRun) as err:
            raise ValueError(f"{path}, line {number}: not a run record ({err}); each line is "
                             '{"recorded": {...}, "manifest": {...}}') from err
        out[record.run.key] = record
    return out


#: Manifest fields a record leaves out: (field, sub-field).
LEFT_OUT = (("achieved", "layers"),)


def _slim(manifest: dict) -> dict:
    """The manifest as recorded: without the ``LEFT_OUT`` tables."""
    out = dict(manifest)
    for field_name, sub in LEFT_OUT:
        if isinstance(out.get(field_name), dict):
            out[field_name] = {k: v for k, v in out[field_name].items() if k != sub}
    return out


def write_records(path: str | Path, runs, *, commit: str, machine: str) -> int:
    """Record each of ``runs`` (``RunManifest``s) that ``path`` lacks, or holds with fewer metrics; returns how many
    records were written. The file is replaced whole, through a temporary file (a crash leaves the old one)."""
    path = Path(path)
    records = read_records(path)
    written = 0
    for run in runs:
        old = records.get(run.key)
        if old is not None and set(run.metrics) <= set(old.run.metrics):
            continue
        records[run.key] = Record(run, {"commit": commit, "machine": machine,
                                        "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        written += 1
    if written:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(json.dumps({"recorded": r.recorded, "manifest": _slim(r.run.raw)})
                                     + "\n" for r in records.values()))
        temporary.replace(path)
    return written
