"""Reading runs: a run folder's manifest (``RunManifest``, with bad runs named, not fatal), its weight files,
listing the cache's runs, and the zip a user downloads.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pruner.allocation import ALLOCATORS
from pruner.model.anatomy import not_pruned_text
from pruner.store.files import MANIFEST, WEIGHTS_DROPPED, read_manifest
from pruner.store.formats import FILES_FIELD, CorruptArtifact, file_records, files_problem
from pruner.store.layout import CacheLayout, check_key

#: Subfolder of a LoRA-recovered run that holds its (unmerged) adapters, in peft's format.
LORA_SUBFOLDER = "lora"


def _weight_files(folder: Path) -> list[Path]:
    """The files that hold a run's tensors: safetensors shards and their index, LoRA adapters included."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")))


def weight_records(folder: Path) -> dict:
    """The size and checksum of each of a run folder's weight files (``pruner.store.formats.file_records``)."""
    folder = Path(folder)
    return file_records(folder, [p.relative_to(folder) for p in _weight_files(folder)])


def require_weights(folder: Path) -> None:
    """The one check for everything that reads a run's weights (loading, streaming, zipping): ``BadRun`` (a
    ValueError), saying how to get them back, when they were dropped; ``CorruptArtifact`` when a weight file is
    missing, truncated, altered or another run's (against the sizes and checksums its manifest recorded)."""
    folder = Path(folder)
    try:
        raw = read_manifest(folder)
    except json.JSONDecodeError as err:  # named like read_run names it
        raise CorruptRun(folder, f"run {folder.name}: {MANIFEST} is not valid JSON ({err}); remove it with "
                                 f"`python -m pruner cache --remove {folder.name}`") from err
    if WEIGHTS_DROPPED in raw:
        raise BadRun(f"run {folder.name} keeps only its manifest and metrics: its weights were dropped after "
                     f"evaluation on {raw[WEIGHTS_DROPPED]['when']} to save disk. Prune it again to restore them "
                     "(`python -m pruner prune ... --force` with the same settings): the same spec gives the same "
                     "weights.")
    problem = files_problem(folder, raw.get(FILES_FIELD, {}))
    if problem:
        again = (f"`python -m pruner recover --run {raw['parent']} --force`" if "recovery" in raw else
                 "`python -m pruner prune ... --force` with the same settings")
        raise CorruptArtifact("run", folder, problem, remedy=f"make it again ({again}: the same spec gives the same "
                                                            "weights)")


def drop_weights(folder: Path) -> int:
    """Remove a stored run's weight files, keeping its manifest (metrics, allocation, timings) and its config and
    tokenizer files; returns the bytes freed. For studies of many prunes, where only the evaluations are wanted
    (a SmolLM2 run is 0.5 GB; a 7B one is 13 GB in float16). The manifest is marked first, so a run interrupted
    half-way is never taken for a loadable one; its zip for download, if any, goes too."""
    from pruner.store.files import update_json_entry

    folder = Path(folder)
    read_run(folder)  # a clear error for a folder that is not a run
    files = _weight_files(folder)
    freed = sum(p.stat().st_size for p in files)
    update_json_entry(folder / MANIFEST, WEIGHTS_DROPPED, lambda previous: previous or {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bytes": freed})
    for p in files:
        p.unlink()
    CacheLayout.at(folder.parent.parent).export(folder.name).unlink(missing_ok=True)
    return freed


class BadRun(ValueError):
    """A run folder whose manifest is missing, truncated or not what this code writes."""


class CorruptRun(BadRun, CorruptArtifact):
    """A run whose manifest is not readable: a corrupt cache entry (the CLI's environment exit code), not bad
    input."""

    def __init__(self, folder: Path, message: str):
        ValueError.__init__(self, message)
        self.folder, self.problem = Path(folder), message


@dataclass(frozen=True)
class RunManifest:
    """A stored run as the pages and the CLI read it. ``raw`` keeps the whole manifest (it is also the download's
    manifest.json); everything else is read through the fields and methods here."""

    key: str
    label: str
    spec: dict  # the run's identity: model and calibration identity, allocator, method, their parameters, ...
    created: str
    achieved_overall: float
    achieved_block: list
    timings: dict
    metrics: dict
    allocation: dict = field(default_factory=dict)
    parent: str | None = None
    recovery: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "RunManifest":
        try:
            spec = dict(d["spec"])
            if spec.get("format", 1) == 1:  # flat λ, M, β of the first run format → the allocator's parameters
                spec["allocator_params"] = {k: spec.pop(k) for k in ("lam", "m", "beta") if spec.get(k) is not None}
                spec["method_params"] = {}
            return cls(key=d["key"], label=d["label"], spec=spec, created=d.get("created", ""),
                       achieved_overall=float(d["achieved"]["overall"]), achieved_block=list(d["achieved"]["block"]),
                       timings=dict(d.get("timings_s", {})), metrics=dict(d.get("metrics", {})),
                       allocation=dict(d.get("allocation", {})), parent=d.get("parent"), recovery=d.get("recovery"),
                       raw=d)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BadRun(f"manifest lacks or garbles {err}") from err

    # -- what was run ----------------------------------------------------------------------------------------
    @property
    def allocator(self) -> str:
        return self.spec["allocator"]

    @property
    def allocator_params(self) -> dict:
        return dict(self.spec.get("allocator_params") or {})

    @property
    def method(self) -> str:
        return self.spec["method"]

    @property
    def method_params(self) -> dict:
        return dict(self.spec.get("method_params") or {})

    @property
    def sparsity(self) -> float:
        return float(self.spec["sparsity"])

    @property
    def nm(self) -> str | None:
        return self.spec.get("nm")

    @property
    def achieved_decoder(self) -> float | None:
        """Zeros ÷ parameters over every weight of the decoder blocks (None: a run made before this was kept)."""
        value = self.raw.get("achieved", {}).get("decoder_overall")
        return None if value is None else float(value)

    def accounting_lines(self) -> list[str]:
        """What was not pruned and why, and the experts pruned by the fallback: one line each, for the CLI."""
        lines = []
        summary = self.raw.get("model_summary", {})
        lines += [not_pruned_text(w) for w in summary.get("not_pruned", [])]
        fallback = self.raw.get("achieved", {}).get("expert_fallback")
        if fallback and sum(fallback["per_block"]):
            lines.append(f"experts with fewer than {fallback['min_routed_tokens']} routed calibration tokens, pruned "
                         f"by {fallback['method']} instead: {sum(fallback['per_block'])} matrices "
                         f"(per block: {fallback['per_block']})")
        return lines

    @property
    def weights_dropped(self) -> bool:
        """Whether only the manifest and metrics are left (``drop_weights``)."""
        return WEIGHTS_DROPPED in self.raw

    @property
    def is_recovery(self) -> bool:
        return self.recovery is not None

    @property
    def method_label(self) -> str:
        """The method as the Compare charts group runs: a LoRA-recovered run is its own line ("wanda + LoRA")."""
        return self.method + (" + LoRA" if self.is_recovery else "")

    @property
    def model_identity(self) -> dict:
        return self.spec["model"]

    @property
    def model_name(self) -> str:
        ident = self.model_identity
        return ident.get("name") or ident.get("path") or ident.get("hub_id") or "?"

    def model_spec(self):
        """The dense model this run was pruned from, as a ModelSpec."""
        from pruner.model.catalogue import ModelSpec

        ident = self.model_identity
        return ModelSpec(name=self.model_name, dtype=ident.get("dtype", "float32"), revision=ident.get("revision"))

    def parameters_text(self) -> str:
        """'λ=0.08, M=5; iterations=20, ρ=1' — the allocator's, then the method's parameters by paper symbol."""
        from pruner.core.params import params_text
        from pruner.methods import METHODS

        declared_a = ALLOCATORS[self.allocator].params if self.allocator in ALLOCATORS else ()
        declared_m = METHODS[self.method].params if self.method in METHODS else ()
        tuned = " (tuned on the predictor)" if self.raw.get("tuning") else ""
        return "; ".join(t for t in (params_text(self.allocator_params, declared_a) + tuned,
                                     params_text(self.method_params, declared_m)) if t)

    @property
    def work_seconds(self) -> float | None:
        """The run's own work: pruning, or the LoRA training of a recovered run."""
        return self.timings.get("recover" if self.is_recovery else "prune")

    # -- what was measured -----------------------------------------------------------------------------------
    def metric_names(self, prefix: str) -> list[str]:
        return [k for k in self.metrics if k.startswith(prefix)]

    def latest_perplexity(self) -> dict | None:
        """The perplexity result added last (a dict with ``perplexity``, ``chunks``, ``chunks_total``,
        ``partial``, ...), or None."""
        names = self.metric_names("perplexity")
        return self.metrics[names[-1]] if names else None


def read_run(folder: Path) -> RunManifest:
    """The typed manifest of a run folder; ``BadRun`` naming the run and the problem when it cannot be read."""
    folder = Path(folder)
    try:
        raw = read_manifest(folder)
    except json.JSONDecodeError as err:
        raise CorruptRun(folder, f"run {folder.name}: {MANIFEST} is not valid JSON ({err}); remove it with "
                                 f"`python -m pruner cache --remove {folder.name}`") from err
    except ValueError as err:
        raise BadRun(f"run {folder.name}: {err}") from err
    try:
        return RunManifest.from_dict(raw)
    except BadRun as err:
        raise BadRun(f"run {folder.name}: {err}") from err


def run_folder(key: str, cache_dir: Path | None = None) -> Path:
    """The folder of stored run ``key``; ValueError when ``key`` is not a key or no such run is stored."""
    folder = CacheLayout.at(cache_dir).run(check_key(key))
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"no run {key!r} in {folder.parent}; `python -m pruner prune ...` prints run keys")
    return folder


@dataclass(frozen=True)
class RunListing:
    runs: list  # RunManifest, newest first
    broken: list  # (folder name, why it cannot be read)


def list_runs(cache_dir: Path | None = None) -> RunListing:
    """Every stored run, newest first, and the folders whose manifest cannot be read (named, not hidden)."""
    root = CacheLayout.at(cache_dir).runs
    runs, broken = [], []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / MANIFEST).exists():
            continue  # a write in progress, or an interrupted one (`pruner cache` removes those)
        try:
            runs.append(read_run(folder))
        except BadRun as err:
            broken.append((folder.name, str(err)))
    return RunListing(sorted(runs, key=lambda r: r.created, reverse=True), broken)


def run_dir(key: str, cache_dir: Path | None = None) -> Path:
    """Where run ``key`` is (or would be) stored; ValueError when ``key`` is not a key."""
    return CacheLayout.at(cache_dir).run(key)


def run_exists(key: str, cache_dir: Path | None = None) -> bool:
    return (run_dir(key, cache_dir) / MANIFEST).is_file()


#: Deflate level of a run's download zip. A pruned model's zeros compress: a 70% SmolLM2 run's 513 MB of weights
#: took 8.8 s to 176 MB at level 1, 34 s to 160 MB at level 6, and stay 513 MB stored (AMD EPYC, 2 cores).
ZIP_LEVEL = 1


def download_name(run: RunManifest) -> str:
    """The file name a run downloads as: model, allocator, method, target S (and N:M), key — e.g.
    ``smollm2-135m_owl_wanda_70pct_4526cb2705904a6d.zip``."""
    model = Path(run.model_name).name or "model"
    parts = [model, run.allocator, run.method, f"{round(run.sparsity * 100):d}pct"]
    if run.spec.get("nm"):
        parts.append(run.spec["nm"].replace(":", "of"))
    if run.is_recovery:
        parts.append("lora")
    safe = "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", p).strip("-") for p in parts)
    return f"{safe}_{run.key}.zip"


def current_zip(folder: Path) -> Path | None:
    """The run's download zip when it is built and holds the current manifest, else None."""
    import zipfile

    folder = Path(folder)
    target = CacheLayout(folder.parent.parent).run_zip(folder)  # a run folder is <cache>/runs/<key>
    # compared by content: file times tick too coarsely to order a zip and a manifest written in the same moment
    try:
        with zipfile.ZipFile(target) as z:
            if z.read(f"{folder.name}/{MANIFEST}") == (folder / MANIFEST).read_bytes():
                return target
    except (OSError, KeyError, zipfile.BadZipFile):
        pass  # no zip yet, or one without a manifest
    return None


def run_zip(folder: Path) -> Path:
    """A compressed zip of a run folder (Hugging Face files + manifest.json) next to it, built atomically, and built
    again only when the manifest in it is not the current one (an evaluation added metrics since)."""
    import zipfile

    folder = Path(folder)
    require_weights(folder)
    found = current_zip(folder)
    if found is not None:
        return found
    target = CacheLayout(folder.parent.parent).run_zip(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL) as z:
            for path in sorted(folder.rglob("*")):  # subfolders too (a LoRA run's adapters live in lora/)
                # regular files only: a link inside a run folder (none is written there) could point anywhere
                if path.is_file() and not path.is_symlink():
                    z.write(path, f"{folder.name}/{path.relative_to(folder)}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
