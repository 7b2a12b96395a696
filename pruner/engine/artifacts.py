"""Statistics and allocations: the dense model's calibration statistics, any allocator's result from them, and
learned allocations (BESA) cached per model, calibration set, S and parameters.

Each function takes specs (never argparse namespaces or session state) and an optional cache directory. Pruned
runs are ``pruner.runs.execute``; their metrics ``pruner.runs.metrics``; the requests that the CLI, the job worker and the
pages share are ``pruner.jobs.workflows``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pruner.allocation import (ALLOCATORS, NEEDS_STATISTICS, NEEDS_WEIGHTS, Allocation, allocate, check_expert_split,
                               check_sparsity, with_expert_split)
from pruner.core.memory import peak_rss_gb
from pruner.data import calibration_tokens
from pruner.engine.calibrate import ProgressFn
from pruner.engine.layout import ModelLayout
from pruner.engine.memory_plan import check_fits, plan_for_statistics, prune_ways_out, learning_kind
from pruner.engine.stats import Stats, collect_stats
from pruner.model.loading import LoadedModel, load_model, model_summary
from pruner.specs import StatsSpec
from pruner.store.files import atomic_dir
from pruner.store.formats import FILES_FIELD, CorruptArtifact, entry_problem, file_records, stable_hash
from pruner.store.layout import CacheLayout


def stats_dir(spec: StatsSpec, cache_dir: Path | None = None) -> Path:
    return CacheLayout.at(cache_dir).stats(spec.key())


def load_cached_stats(spec: StatsSpec, cache_dir: Path | None = None) -> Stats | None:
    """The cached statistics for ``spec``, or None if they were never computed; ``pruner.engine.stats.CorruptStatistics``
    when what is cached is not what it claims (truncated, altered, another spec's)."""
    folder = stats_dir(spec, cache_dir)
    return Stats.load(folder, key=spec.key()) if (folder / "meta.json").exists() else None


def save_stats(spec: StatsSpec, stats: Stats, cache_dir: Path | None = None) -> Path:
    folder = stats_dir(spec, cache_dir)
    with atomic_dir(folder) as tmp:
        stats.save(tmp, key=spec.key())
    return folder


def check_statistics_fit(spec: StatsSpec, cache_dir: Path | None = None, *, batch_size: int, streamed: bool,
                         learning: bool | str = False) -> None:
    """Refuse a statistics (or learning) pass whose memory plan does not fit, naming the numbers and ways out."""
    plan = plan_for_statistics(spec, cache_dir, batch_size=batch_size, streamed=streamed, learning=learning)
    check_fits(plan, ways=prune_ways_out(streamed=streamed, offloaded=spec.model.offload_activations,
                                         device=plan.device),
               what="this learning pass" if learning else "this statistics pass")


def compute_stats(
    spec: StatsSpec,
    cache_dir: Path | None = None,
    loaded: LoadedModel | None = None,
    progress: ProgressFn | None = None,
    batch_size: int = 4,
    should_cancel: Callable[[], bool] | None = None,
    tokens=None,
    stream: bool = False,
) -> Stats:
    """Run the calibration pass on the dense model (does not save; see ``get_stats``). ``tokens``: the spec's
    calibration tokens if the caller already has them. ``stream`` (when no ``loaded`` model is passed): read each
    block from the checkpoint for its turn (``pruner.model.streaming``); the statistics are the same. Before a
    model is loaded the pass's memory is planned and refused when it does not fit."""
    if loaded is None:
        check_statistics_fit(spec, cache_dir, batch_size=batch_size, streamed=stream)
    loaded = loaded if loaded is not None else load_model(spec.model, cache_dir, stream=stream)
    t0 = time.perf_counter()
    tokens = tokens if tokens is not None else calibration_tokens(loaded.tokenizer, spec.calib)
    t_data = time.perf_counter() - t0
    stats = collect_stats(loaded.model, tokens, loaded.device, batch_size=batch_size, progress=progress,
                          should_cancel=should_cancel, blocks=loaded.block_store(),
                          offload=loaded.spec.offload_activations)
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


def allocation_for(spec: StatsSpec, allocator: str, sparsity: float, params: dict | None = None, *,
                   cache_dir: Path | None = None, expert_split: str = "uniform", expert_params: dict | None = None,
                   **kwargs) -> tuple[Stats | ModelLayout, Allocation]:
    """The allocation's inputs and one allocation with ``params`` (the allocator's declared parameters; missing
    ones take their defaults): cached statistics when there are some, else only what the allocator needs (the
    model's layout or weights, or a statistics pass). Newly computed statistics are saved only if the allocation
    succeeds, so a rejected λ leaves the cache as it was. A learned allocator's sparsities are learned (or read
    from the cache) first. ``expert_split`` shares each block's sparsity among its routed experts
    (``pruner.allocation.with_expert_split``); any split but 'uniform' reads the statistics."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    a = ALLOCATORS[allocator]
    params = a.check(params)
    expert_params = check_expert_split(expert_split, expert_params)
    if a.learned:
        result = learn_allocation(spec, allocator, sparsity, params, cache_dir, **kwargs)
        stats = get_stats(spec, cache_dir)  # cached by the learning pass when it collected them
        return stats, with_expert_split(allocate(allocator, stats, sparsity,
                                                 learned=learned_layer_sparsity(result, stats), **params),
                                        stats, expert_split, **expert_params)
    cached = load_cached_stats(spec, cache_dir)
    if cached is None and a.needs != NEEDS_STATISTICS and expert_split == "uniform":
        loaded = kwargs.get("loaded") or load_model(spec.model, cache_dir, stream=kwargs.get("stream", False))
        layout = ModelLayout.of(loaded.model, weights=a.needs == NEEDS_WEIGHTS, blocks=loaded.block_store(),
                                device=loaded.device)
        return layout, allocate(allocator, layout, sparsity, **params)
    stats = cached if cached is not None else compute_stats(spec, cache_dir, **kwargs)
    result = with_expert_split(allocate(allocator, stats, sparsity, **params), stats, expert_split, **expert_params)
    if cached is None:
        save_stats(spec, stats, cache_dir)
    return stats, result


# ---------------------------------------------------------------------------------------------------------------
# Learned allocators (BESA): per-layer sparsities learned through the model, cached per (model, calibration, S,
# parameters, the learner's fixed settings)


#: The file a learned allocation is stored in (beside a meta.json with its key and checksum).
LEARNED_FILE = "learned.json"


def learned_key(spec: StatsSpec, allocator: str, sparsity: float, params: dict | None = None) -> str:
    return stable_hash({"model": spec.model.identity(), "calib": spec.calib.identity(), "allocator": allocator,
                        "sparsity": check_sparsity(sparsity), "params": ALLOCATORS[allocator].keyed(params),
                        "settings": ALLOCATORS[allocator].resolve_learner().settings})


def cached_learned(spec: StatsSpec, allocator: str, sparsity: float, params: dict | None = None,
                   cache_dir: Path | None = None) -> dict | None:
    """The learned allocation for this model, calibration set, S and parameters, or None if never learned."""
    key = learned_key(spec, allocator, sparsity, params)
    folder = CacheLayout.at(cache_dir).learned(key)
    if not (folder / LEARNED_FILE).exists() and not (folder / "meta.json").exists():
        return None
    problem = entry_problem(folder, key=key, required=(LEARNED_FILE,))
    if problem:
        raise CorruptArtifact("learned allocation", folder, problem)
    return json.loads((folder / LEARNED_FILE).read_text())


def learned_variants(spec: StatsSpec, allocator: str, sparsity: float, cache_dir: Path | None = None) -> dict[str, dict]:
    """The parameter sets ``allocator`` has a cached result for, on this model and calibration set at S = ``sparsity``,
    by learned key (checked, defaults filled, as ``learned_key`` takes them). An entry counts only where its key is the
    one these parameters give now: one learned under other settings of the learner cannot be shown."""
    sparsity = check_sparsity(sparsity)
    found = {}
    for folder in sorted((CacheLayout.at(cache_dir).root / "learned").glob("*")):
        try:
            result = json.loads((folder / LEARNED_FILE).read_text())
            if result.get("allocator") != allocator or result.get("sparsity") != sparsity:
                continue
            params = ALLOCATORS[allocator].check(result.get("params") or {})
        except (OSError, ValueError, AttributeError):  # unreadable or foreign: `pruner cache --stale` names it
            continue
        if learned_key(spec, allocator, sparsity, params) == folder.name:
            found[folder.name] = params
    return found


def learn_allocation(spec: StatsSpec, allocator: str, sparsity: float, params: dict | None = None,
                     cache_dir: Path | None = None, *, loaded: LoadedModel | None = None, tokens=None,
                     stats: Stats | None = None, progress: ProgressFn | None = None,
                     should_cancel: Callable[[], bool] | None = None, batch_size: int = 4,
                     stream: bool = False) -> dict:
    """Learn (or load the cached) per-layer sparsities of a learned allocator on the dense model.

    Returns the learner's result (``layer_names``, ``layer_block``, ``layer_sparsity`` in the statistics' order,
    and what it reports) with ``allocator``, ``sparsity``, ``params``, ``settings``, ``seconds``. The dense model
    is not modified. The cache entry appears only when complete. ``stats``: the spec's statistics if the caller has
    them (else cached, else collected by the learning pass and cached like a separate pass's). ``stream`` (when no
    ``loaded`` model is passed): each block is read from the checkpoint for its turn (same result)."""
    S = check_sparsity(sparsity)
    params = ALLOCATORS[allocator].check(params)
    found = cached_learned(spec, allocator, S, params, cache_dir)
    if found is not None:
        return found
    learner = ALLOCATORS[allocator].resolve_learner()
    if loaded is None:
        check_statistics_fit(spec, cache_dir, batch_size=batch_size, streamed=stream,
                             learning=learning_kind(allocator, params))
    loaded = loaded if loaded is not None else load_model(spec.model, cache_dir, stream=stream)
    tokens = tokens if tokens is not None else calibration_tokens(loaded.tokenizer, spec.calib)
    stats = stats if stats is not None else load_cached_stats(spec, cache_dir)
    t0 = time.perf_counter()
    collected = stats is None
    # streamed: each block is read from the checkpoint for its turn (the dense weights are only read, never written)
    result, stats = learner.learn(loaded.model, tokens, S, stats, params, device=loaded.device,
                                  batch_size=batch_size, progress=progress, should_cancel=should_cancel,
                                  blocks=loaded.block_store(), offload=loaded.spec.offload_activations,
                                  context={"spec": spec, "cache_dir": cache_dir, "loaded": loaded,
                                           "progress": progress, "should_cancel": should_cancel})
    if collected:
        stats.meta.update(key=spec.key(), model=spec.model.identity(), calib=spec.calib.identity(),
                          summary=model_summary(loaded), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        save_stats(spec, stats, cache_dir)
    import torch  # (loaded by now: the learner ran on it)

    peak_gb, peak_since = peak_rss_gb()  # a job's own (the worker resets it per job), else this process's
    result = {"allocator": allocator, "sparsity": S, "params": params, "settings": learner.settings,
              "model": spec.model.identity(), "calib": spec.calib.identity(),
              "seconds": round(time.perf_counter() - t0, 2), "peak_rss_gb": peak_gb, "peak_rss_since": peak_since,
              "device": str(loaded.device), "torch_threads": torch.get_num_threads(), **result}
    key = learned_key(spec, allocator, S, params)
    with atomic_dir(CacheLayout.at(cache_dir).learned(key)) as tmp:
        (tmp / LEARNED_FILE).write_text(json.dumps(result, indent=1))
        (tmp / "meta.json").write_text(json.dumps({"key": key, FILES_FIELD: file_records(tmp, [LEARNED_FILE])}))
    return result


def learned_layer_sparsity(result: dict, inputs) -> np.ndarray:
    """The learned per-layer sparsities in the statistics' (or layout's) layer order, checked name by name."""
    ours = list(zip(result["layer_block"], result["layer_names"]))
    theirs = list(zip(np.asarray(inputs.layer_block).tolist(), inputs.layer_names))
    if ours != theirs:
        raise ValueError("the learned allocation was learned on a model with different prunable layers than these "
                         "statistics")
    return np.asarray(result["layer_sparsity"], dtype=np.float64)
