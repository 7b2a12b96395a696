"""The library's front door: what the CLI and the pages call.

Each function takes specs (never argparse namespaces or session state) and an optional cache directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from pruner.allocation import ALLOCATORS, NEEDS_STATISTICS, NEEDS_WEIGHTS, Allocation, allocate
from pruner.calibrate import ProgressFn
from pruner.data import calibration_tokens
from pruner.models import LoadedModel, load_model, model_summary
from pruner.specs import StatsSpec
from pruner.stats import ModelLayout, Stats, collect_stats
from pruner.store import atomic_dir, default_cache_dir



def stats_dir(spec: StatsSpec, cache_dir: Path | None = None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "stats" / spec.key()


def load_cached_stats(spec: StatsSpec, cache_dir: Path | None = None) -> Stats | None:
    """The cached statistics for ``spec``, or None if they were never computed."""
    folder = stats_dir(spec, cache_dir)
    return Stats.load(folder) if (folder / "meta.json").exists() else None


def save_stats(spec: StatsSpec, stats: Stats, cache_dir: Path | None = None) -> Path:
    folder = stats_dir(spec, cache_dir)
    with atomic_dir(folder) as tmp:
        stats.save(tmp)
    return folder


def compute_stats(
    spec: StatsSpec,
    cache_dir: Path | None = None,
    loaded: LoadedModel | None = None,
    progress: ProgressFn | None = None,
    batch_size: int = 4,
    should_cancel: Callable[[], bool] | None = None,
    tokens=None,
) -> Stats:
    """Run the calibration pass on the dense model (does not save; see ``get_stats``). ``tokens``: the spec's
    calibration tokens if the caller already has them."""
    loaded = loaded if loaded is not None else load_model(spec.model, cache_dir)
    t0 = time.perf_counter()
    tokens = tokens if tokens is not None else calibration_tokens(loaded.tokenizer, spec.calib)
    t_data = time.perf_counter() - t0
    stats = collect_stats(loaded.model, tokens, loaded.device, batch_size=batch_size, progress=progress,
                          should_cancel=should_cancel)
    stats.meta.update(
        key=spec.key(),
        model=spec.model.identity(),
        calib=spec.calib.identity(),
        summary=model_summary(loaded),
        data_seconds=round(t_data, 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return stats


def get_stats(spec: StatsSpec, cache_dir: Path | None = None, *, save: bool = True, **kwargs) -> Stats:
    """Cached statistics for ``spec``, computed (and saved, unless ``save=False``) when missing."""
    cached = load_cached_stats(spec, cache_dir)
    if cached is not None:
        return cached
    stats = compute_stats(spec, cache_dir, **kwargs)
    if save:
        save_stats(spec, stats, cache_dir)
    return stats


def allocation_for(spec: StatsSpec, allocator: str, sparsity: float, *, lam: float | None = None,
                   m: float | None = None, cache_dir: Path | None = None,
                   **kwargs) -> tuple[Stats | ModelLayout, Allocation]:
    """The allocation's inputs and one allocation: cached statistics when there are some, else only what the
    allocator needs (the model's layout or weights, or a statistics pass). Newly computed statistics are saved
    only if the allocation succeeds, so a rejected λ leaves the cache as it was."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    cached = load_cached_stats(spec, cache_dir)
    needs = ALLOCATORS[allocator].needs
    if cached is None and needs != NEEDS_STATISTICS:
        loaded = kwargs.get("loaded") or load_model(spec.model, cache_dir)
        layout = ModelLayout.of(loaded.model, weights=needs == NEEDS_WEIGHTS)
        return layout, allocate(allocator, layout, sparsity, lam=lam, m=m)
    stats = cached if cached is not None else compute_stats(spec, cache_dir, **kwargs)
    result = allocate(allocator, stats, sparsity, lam=lam, m=m)
    if cached is None:
        save_stats(spec, stats, cache_dir)
    return stats, result


# ---------------------------------------------------------------------------------------------------------------
# BESA: per-layer sparsities learned through the model (pruner.besa), cached per (model, calibration, S, β)


def besa_key(spec: StatsSpec, sparsity: float, beta: float) -> str:
    from pruner.besa import BESA_DEFAULT_EPOCHS, BESA_DEFAULT_LR, BESA_FORMAT_VERSION, BESA_STEP
    from pruner.specs import stable_hash

    return stable_hash({"model": spec.model.identity(), "calib": spec.calib.identity(), "sparsity": float(sparsity),
                        "beta": float(beta), "epochs": BESA_DEFAULT_EPOCHS, "lr": BESA_DEFAULT_LR, "step": BESA_STEP,
                        "format": BESA_FORMAT_VERSION})


def _besa_path(spec: StatsSpec, sparsity: float, beta: float, cache_dir: Path | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "besa" / besa_key(spec, sparsity, beta)


def cached_besa(spec: StatsSpec, sparsity: float, beta: float | None = None,
                cache_dir: Path | None = None) -> dict | None:
    """The learned BESA allocation for this model, calibration set, S and β, or None if never learned."""
    from pruner.allocation import BESA_DEFAULT_BETA

    path = _besa_path(spec, sparsity, BESA_DEFAULT_BETA if beta is None else beta, cache_dir) / "besa.json"
    return json.loads(path.read_text()) if path.exists() else None


def besa_allocation(spec: StatsSpec, sparsity: float, beta: float | None = None, cache_dir: Path | None = None, *,
                    loaded: LoadedModel | None = None, tokens=None, stats: Stats | None = None,
                    progress: ProgressFn | None = None,
                    should_cancel: Callable[[], bool] | None = None, batch_size: int = 4) -> dict:
    """Learn (or load the cached) BESA per-layer sparsities on the dense model.

    Returns {"layer_sparsity": [...], "layer_names", "layer_block", per-block "learned_mean", "shift",
    "error_first", "error_last", "error_hard", "error_uniform", "seconds", settings}; the layer order is the
    statistics' order. The dense model is not modified. The cache entry appears only when complete. ``stats``: the
    spec's statistics if the caller has them (else cached or computed)."""
    from pruner.allocation import BESA_DEFAULT_BETA, check_sparsity
    from pruner.besa import BESA_DEFAULT_EPOCHS, BESA_DEFAULT_LR, BESA_STEP, learn_sparsities

    S = check_sparsity(sparsity)
    beta = BESA_DEFAULT_BETA if beta is None else float(beta)
    found = cached_besa(spec, S, beta, cache_dir)
    if found is not None:
        return found
    loaded = loaded if loaded is not None else load_model(spec.model, cache_dir)
    tokens = tokens if tokens is not None else calibration_tokens(loaded.tokenizer, spec.calib)
    stats = stats if stats is not None else load_cached_stats(spec, cache_dir)
    t0 = time.perf_counter()
    collected = stats is None  # then the learning pass collects them, and they are cached like a separate pass's
    blocks, stats = learn_sparsities(loaded.model, tokens, S, stats, beta=beta, device=loaded.device,
                                     batch_size=batch_size, progress=progress, should_cancel=should_cancel)
    if collected:
        stats.meta.update(key=spec.key(), model=spec.model.identity(), calib=spec.calib.identity(),
                          summary=model_summary(loaded), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        save_stats(spec, stats, cache_dir)
    result = {
        "sparsity": S, "beta": beta, "epochs": BESA_DEFAULT_EPOCHS, "lr": BESA_DEFAULT_LR, "step": BESA_STEP,
        "model": spec.model.identity(), "calib": spec.calib.identity(),
        "seconds": round(time.perf_counter() - t0, 2),
        "layer_names": [n for b in blocks for n in b.layer_names],
        "layer_block": [i for i, b in enumerate(blocks) for _ in b.layer_names],
        "layer_sparsity": [float(v) for b in blocks for v in b.sparsity],
        "layer_learned": [float(v) for b in blocks for v in b.learned],
        "learned_mean": [float((b.learned * b.numel).sum() / b.numel.sum()) for b in blocks],
        "shift": [b.shift for b in blocks],
        **{k: [getattr(b, k) for b in blocks] for k in ("error_first", "error_last", "error_hard", "error_uniform")},
        "steps_per_block": blocks[0].steps,
    }
    with atomic_dir(_besa_path(spec, S, beta, cache_dir)) as tmp:
        (tmp / "besa.json").write_text(json.dumps(result, indent=1))
    return result


def besa_layer_sparsity(result: dict, stats: Stats):
    """The learned per-layer sparsities in the statistics' layer order (checked name by name)."""
    import numpy as np

    ours = list(zip(result["layer_block"], result["layer_names"]))
    theirs = list(zip(stats.layer_block.tolist(), stats.layer_names))
    if ours != theirs:
        raise ValueError("the BESA allocation was learned on a model with different prunable layers than these "
                         "statistics")
    return np.asarray(result["layer_sparsity"], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Pruning runs and evaluation

PhaseProgress = Callable[[str, int, int], None]  # (phase, done, total)


def _peak_memory() -> dict:
    import resource

    import torch

    out = {"process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available():
        out["cuda_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _versions() -> dict:
    import platform

    import torch
    import transformers

    import pruner

    return {"pruner": pruner.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_prune(spec, cache_dir: Path | None = None, *, loaded: LoadedModel | None = None,
              progress: PhaseProgress | None = None, should_cancel: Callable[[], bool] | None = None,
              force: bool = False, batch_size: int = 4) -> Path:
    """Prune a copy of the dense model as ``spec`` says and store it as a run; return the run folder.

    The allocation comes from the dense model's cached statistics (computed first if missing). An existing run
    of the same spec is returned as it is unless ``force``. The folder appears only when complete.
    """
    import copy

    from pruner.methods import METHODS, NM
    from pruner.prune import layer_targets, prune_model
    from pruner.store import read_manifest, run_dir, run_exists

    folder = run_dir(spec.key(), cache_dir)
    if run_exists(spec.key(), cache_dir) and not force:
        return folder
    phase = (lambda name: (lambda d, t: progress(name, d, t))) if progress else (lambda name: None)
    t_start = time.perf_counter()
    base = loaded if loaded is not None else load_model(spec.model, cache_dir)
    allocator = ALLOCATORS[spec.allocator]
    stats = load_cached_stats(spec.stats_spec, cache_dir)
    # the dense statistics pass runs only for an allocator that reads them (uniform and ER read the layout,
    # AlphaPruning the weights); cached statistics serve every allocator
    # BESA collects them in its own learning pass when they are missing (pruner.besa.StatsAndBesaObserver)
    stats_pass = stats is None and allocator.needs == NEEDS_STATISTICS and not allocator.learned
    # tokenized once, for the statistics pass (when it runs) and for pruning
    needs_tokens = METHODS[spec.method].needs_inputs or stats_pass or allocator.learned
    tokens = calibration_tokens(base.tokenizer, spec.calib) if needs_tokens else None
    t0 = time.perf_counter()
    if stats_pass:
        stats = get_stats(spec.stats_spec, cache_dir, loaded=base, tokens=tokens, progress=phase("statistics"),
                          batch_size=batch_size)
    source = "statistics pass" if stats_pass else "cached statistics" if stats is not None else f"model {allocator.needs}"
    if stats is None and not allocator.learned:
        stats_or_layout = ModelLayout.of(base.model, weights=allocator.needs == NEEDS_WEIGHTS)
    else:
        stats_or_layout = stats
    t_stats = time.perf_counter() - t0
    learned, t_learn = None, 0.0
    if ALLOCATORS[spec.allocator].learned:
        t0 = time.perf_counter()
        besa = besa_allocation(spec.stats_spec, spec.sparsity, spec.beta, cache_dir, loaded=base,
                               tokens=tokens, stats=stats, progress=phase("learn allocation"), should_cancel=should_cancel,
                               batch_size=batch_size)
        if stats is None:  # collected in the learning pass and cached there
            stats_or_layout = stats = load_cached_stats(spec.stats_spec, cache_dir)
            source = "statistics collected in the BESA learning pass"
        learned, t_learn = besa_layer_sparsity(besa, stats), time.perf_counter() - t0
    alloc = allocate(spec.allocator, stats_or_layout, spec.sparsity, lam=spec.lam, m=spec.m, beta=spec.beta, learned=learned)
    nm = NM.parse(spec.nm) if spec.nm else None
    targets = layer_targets(alloc.layer_sparsity, list(zip(stats_or_layout.layer_block.tolist(), stats_or_layout.layer_names)),
                            nm)
    # A model the caller passed in (e.g. the dashboard's cached dense model) is never modified: prune a copy.
    # One this function loaded itself is pruned in place, which saves a model's worth of memory.
    model = copy.deepcopy(base.model) if loaded is not None else base.model
    t0 = time.perf_counter()
    report = prune_model(model, tokens, spec.method, targets, spec.scope, base.device, batch_size,
                         progress=phase("prune"), should_cancel=should_cancel)
    t_prune = time.perf_counter() - t0
    manifest = {
        "key": spec.key(),
        "label": spec.label(),
        "spec": spec.identity(),
        "model_summary": model_summary(base),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "allocation": alloc.to_dict(),
        "achieved": {
            "overall": report.overall(),
            "block": report.block_achieved().tolist(),
            "layers": [vars(l) for l in report.layers],
        },
        # where the allocation's inputs came from: cached statistics, a statistics pass run now, or the model alone
        "allocation_inputs": source,
        "timings_s": {"statistics": round(t_stats, 2), **({"learn_allocation": round(t_learn, 2)} if learned is not None
                                                          else {}), "prune": round(t_prune, 2)},
        "memory": _peak_memory(),
        "metrics": {},
    }
    t0 = time.perf_counter()
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        manifest["timings_s"]["save"] = round(time.perf_counter() - t0, 2)
        manifest["timings_s"]["total"] = round(time.perf_counter() - t_start, 2)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    read_manifest(folder)  # fail loudly if the folder is not complete
    return folder


#: Subfolder of a LoRA-recovered run that holds its (unmerged) adapters, in peft's format.
LORA_SUBFOLDER = "lora"


def load_run(folder: Path, device: str = "cpu"):
    """(model, tokenizer) of a stored run, in eval mode. A LoRA-recovered run is its pruned base weights with the
    adapters attached (not merged) through peft."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    adapters = Path(folder) / LORA_SUBFOLDER
    if (adapters / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapters).eval().requires_grad_(False)
    return model.to(device), AutoTokenizer.from_pretrained(folder)


def recover_run(parent_folder: Path, spec, data_dir: str | None, cache_dir: Path | None = None, *,
                device: str = "cpu", progress: PhaseProgress | None = None,
                should_cancel: Callable[[], bool] | None = None, force: bool = False) -> Path:
    """LoRA-recover a stored pruned run (``spec``: a ``pruner.recover.RecoverSpec``) and store the result as a new
    run linked to its parent: the parent's files (hard-linked where possible, else copied), the adapters in
    ``lora/``, and a manifest with the parent's key and the training curve. Returns the new run's folder."""
    import os
    import shutil

    from pruner.models import find_blocks, prunable_layers, weight_matrix
    from pruner.recover import RECOVER_SEED_OFFSET, train_lora
    from pruner.specs import CalibSpec, stable_hash
    from pruner.store import read_manifest, run_dir, run_exists

    parent = read_manifest(parent_folder)
    if "recovery" in parent:
        raise ValueError(f"run {parent['key']} is already a LoRA recovery; recover its parent {parent['parent']} "
                         f"instead")
    if spec.parent != parent["key"]:
        raise ValueError(f"the recovery spec names run {spec.parent}, but the folder holds run {parent['key']}")
    key = stable_hash(spec.identity())
    folder = run_dir(key, cache_dir)
    if run_exists(key, cache_dir) and not force:
        return folder
    t0 = time.perf_counter()
    model, tokenizer = load_run(parent_folder, device)
    c = parent["spec"]["calib"]
    calib = CalibSpec(dataset=c["dataset"], nsamples=spec.steps * spec.batch, seqlen=spec.seqlen,
                      seed=c["seed"] + RECOVER_SEED_OFFSET, data_dir=data_dir)
    tokens = calibration_tokens(tokenizer, calib)
    phase = (lambda d, t: progress("LoRA steps", d, t)) if progress else None
    peft_model, losses = train_lora(model, tokens, spec, seed=calib.seed, device=device, progress=phase,
                                    should_cancel=should_cancel)
    seconds = time.perf_counter() - t0
    # the base weights were frozen: their zeros must be exactly the parent's
    zeros = sum(int((weight_matrix(l) == 0).sum()) for b in find_blocks(peft_model.get_base_model())[1]
                for name, l in prunable_layers(b).items() if "lora_" not in name)  # base layers, not the adapters
    expected = sum(round(l["achieved"] * l["numel"]) for l in parent["achieved"]["layers"])
    if zeros != expected:
        raise RuntimeError(f"LoRA training changed the pruned weights ({zeros} zeros, the parent has {expected})")
    tail = max(1, len(losses) // 10)
    manifest = {
        **{k: parent[k] for k in ("model_summary", "allocation", "achieved") if k in parent},
        "key": key,
        "label": f"{parent['label']} + {spec.label()}",
        "parent": parent["key"],
        "spec": {**parent["spec"], **spec.identity()},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recovery": {
            "settings": spec.identity()["recover"], "data": calib.identity(), "seconds": round(seconds, 2),
            "trainable_params": sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n),
            "losses": losses, "loss_first": sum(losses[:tail]) / tail, "loss_last": sum(losses[-tail:]) / tail,
            "merged": False,
        },
        "timings_s": {"recover": round(seconds, 2)},
        "memory": _peak_memory(),
        "metrics": {},
    }
    with atomic_dir(folder) as tmp:
        for path in Path(parent_folder).iterdir():
            if path.is_file() and path.name != "manifest.json":
                try:
                    os.link(path, tmp / path.name)  # the same bytes: share them
                except OSError:
                    shutil.copy2(path, tmp / path.name)
        peft_model.save_pretrained(tmp / LORA_SUBFOLDER)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def perplexity_metric_name(result: dict) -> str:
    name = f"perplexity:{result['dataset']}:seq{result['seqlen']}"
    return name + (f":first{result['chunks']}" if result["partial"] else "")


def evaluate_perplexity(folder: Path, data_dir: str | None, *, max_chunks: int | None = None,
                        seqlen: int | None = None, device: str = "cpu", batch_size: int = 1,
                        progress: ProgressFn | None = None, should_cancel: Callable[[], bool] | None = None) -> dict:
    """WikiText-2 test perplexity of a stored run; the result is added to its manifest."""
    from pruner.evaluate.perplexity import wikitext2_perplexity
    from pruner.store import add_metrics

    model, tokenizer = load_run(folder, device)
    result = wikitext2_perplexity(model, tokenizer, data_dir, seqlen=seqlen, max_chunks=max_chunks, device=device,
                                  batch_size=batch_size, progress=progress, should_cancel=should_cancel)
    add_metrics(folder, perplexity_metric_name(result), result)
    return result


def _dense_metrics_path(model_spec, cache_dir: Path | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "dense" / model_spec.key() / "metrics.json"


def dense_metrics(model_spec, cache_dir: Path | None = None) -> dict:
    """All cached metrics of the dense model ({metric name: result}); never computes."""
    path = _dense_metrics_path(model_spec, cache_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def _update_dense_metric(model_spec, cache_dir: Path | None, name: str, update: Callable[[dict | None], dict]) -> dict:
    """Set the dense model's cached metric ``name`` to ``update(previous or None)`` under a lock; returns it."""
    from pruner.store import update_json_entry

    path = _dense_metrics_path(model_spec, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return update_json_entry(path, name, update)[name]


def dense_perplexity(model_spec, data_dir: str | None, cache_dir: Path | None = None, *,
                     loaded: LoadedModel | None = None, max_chunks: int | None = None, seqlen: int | None = None,
                     batch_size: int = 1, progress: ProgressFn | None = None) -> dict:
    """WikiText-2 test perplexity of the dense model, cached under cache/dense/<model key>/metrics.json."""
    from pruner.evaluate.perplexity import default_seqlen, wikitext2_perplexity

    base = loaded if loaded is not None else load_model(model_spec, cache_dir)
    seqlen = seqlen or default_seqlen(base.model)
    for name, result in dense_metrics(model_spec, cache_dir).items():
        if name.startswith("perplexity") and result["seqlen"] == seqlen and (
                result["chunks"] == max_chunks or (max_chunks is None and not result["partial"])):
            return result
    home = next(base.model.parameters()).device
    try:  # weights live on CPU between uses; evaluate on the compute device
        base.model.to(base.device)
        result = wikitext2_perplexity(base.model, base.tokenizer, data_dir, seqlen=seqlen, max_chunks=max_chunks,
                                      device=base.device, batch_size=batch_size, progress=progress)
    finally:
        base.model.to(home)
    _update_dense_metric(model_spec, cache_dir, perplexity_metric_name(result), lambda _previous: result)
    return result


def dense_perplexity_cached(model_spec, cache_dir: Path | None = None) -> dict | None:
    """The most recent cached dense perplexity of a model (None if never computed); never computes."""
    found = [v for k, v in dense_metrics(model_spec, cache_dir).items() if k.startswith("perplexity")]
    return found[-1] if found else None


def model_spec_of_run(manifest: dict):
    """The dense model a run was pruned from, as a ModelSpec."""
    from pruner.specs import ModelSpec

    ident = manifest["spec"]["model"]
    name = ident.get("name") or ident.get("path") or ident.get("hub_id")
    return ModelSpec(name=name, dtype=ident.get("dtype", "float32"), revision=ident.get("revision"))


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot accuracy (lm-eval)


def zeroshot_metric_name(source: str, limit: int | None) -> str:
    return f"zeroshot:{source}" + (f":limit{limit}" if limit else "")


def _merge_zeroshot(previous: dict | None, result: dict) -> dict:
    """Tasks evaluated earlier under the same metric name (same source, limit and lm-eval version) are kept."""
    tasks = dict(previous["tasks"]) if previous and previous.get("lm_eval") == result["lm_eval"] else {}
    tasks.update(result["tasks"])
    from pruner.evaluate.zeroshot import DEFAULT_TASKS

    ordered = {t: tasks[t] for t in DEFAULT_TASKS if t in tasks}
    return {**result, "tasks": ordered, "mean_acc": sum(r["acc"] for r in ordered.values()) / len(ordered),
            "complete": len(ordered) == len(DEFAULT_TASKS)}


def _zeroshot(model, tokenizer, device, data_dir, tasks, limit, source, batch_size, progress, should_cancel):
    from pruner.evaluate.zeroshot import zeroshot_accuracy

    return zeroshot_accuracy(model, tokenizer, tasks=tasks, limit=limit, source=source, data_dir=data_dir,
                             batch_size=batch_size, device=str(device), progress=progress,
                             should_cancel=should_cancel)


def evaluate_zeroshot(folder: Path, data_dir: str | None, *, tasks=None, limit: int | None = None,
                      source: str = "local", device: str = "cpu", batch_size: int = 8,
                      progress: ProgressFn | None = None, should_cancel: Callable[[], bool] | None = None) -> dict:
    """Zero-shot accuracy of a stored run (lm-eval, in memory); merged into its manifest under
    ``zeroshot:<source>[:limit<n>]``. Returns the merged result."""
    from pruner.store import update_metrics

    model, tokenizer = load_run(folder, device)
    result = _zeroshot(model, tokenizer, device, data_dir, tasks, limit, source, batch_size, progress, should_cancel)
    name = zeroshot_metric_name(source, limit)
    # merged with what is stored at the moment of writing (another job may have added tasks meanwhile)
    return update_metrics(folder, name, lambda previous: _merge_zeroshot(previous, result))["metrics"][name]


def dense_zeroshot(model_spec, data_dir: str | None, cache_dir: Path | None = None, *, loaded: LoadedModel | None = None,
                   tasks=None, limit: int | None = None, source: str = "local", batch_size: int = 8,
                   progress: ProgressFn | None = None, should_cancel: Callable[[], bool] | None = None) -> dict:
    """Zero-shot accuracy of the dense model, cached with its other metrics; tasks already cached are not rerun."""
    from pruner.evaluate.zeroshot import parse_tasks

    name = zeroshot_metric_name(source, limit)
    previous = dense_metrics(model_spec, cache_dir).get(name)
    wanted = parse_tasks(tasks)
    missing = [t for t in wanted if not previous or t not in previous["tasks"]]
    if not missing:
        return previous
    base = loaded if loaded is not None else load_model(model_spec, cache_dir)
    home = next(base.model.parameters()).device
    try:
        base.model.to(base.device)
        result = _zeroshot(base.model, base.tokenizer, base.device, data_dir, missing, limit, source, batch_size,
                           progress, should_cancel)
    finally:
        base.model.to(home)
    return _update_dense_metric(model_spec, cache_dir, name, lambda stored: _merge_zeroshot(stored, result))


# ---------------------------------------------------------------------------------------------------------------
# CPU speed (ONNX + DeepSparse)


def speed_metric_name(result: dict) -> str:
    s = result["spec"]
    return f"speed:{result['engine']}:b{s['batch']}:t{s['seqlen']}:threads{s['threads']}"


def evaluate_speed(folder: Path, speed_spec=None, cache_dir: Path | None = None, *, engine: str = "auto",
                   progress: PhaseProgress | None = None) -> dict:
    """Time the dense model and a stored run in DeepSparse (or say why not); the result goes into the manifest.

    The dense model's ONNX graphs are kept under cache/dense/<model key>/onnx/<shape>/ for later runs; the pruned
    graphs are temporary.
    """
    from pruner.evaluate.speed import SpeedSpec, cached_graphs, export_and_measure
    from pruner.store import add_metrics, read_manifest

    speed_spec = speed_spec or SpeedSpec()
    manifest = read_manifest(folder)
    if "recovery" in manifest:
        raise ValueError(f"run {manifest['key']} is a LoRA recovery: its unmerged adapters are a dense branch beside "
                         f"the sparse weights, so a speed-up would not be the sparsity's; measure its parent "
                         f"{manifest['parent']}")
    model_spec = model_spec_of_run(manifest)
    onnx_dir = _dense_metrics_path(model_spec, cache_dir).parent / "onnx" / speed_spec.shape_key()
    # the dense model is loaded only when its graphs for this shape are not cached yet
    dense = None if cached_graphs(onnx_dir) else load_model(model_spec, cache_dir).model
    pruned, _ = load_run(folder)
    result = export_and_measure(dense, pruned, speed_spec, dense_dir=onnx_dir, engine=engine, progress=progress)
    result["sparsity"] = manifest["achieved"]["overall"]
    add_metrics(folder, speed_metric_name(result), result)
    return result
