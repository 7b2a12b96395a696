"""Damage tables in the cache: where one lives, finding it, and building it when asked (the model loaded once)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pruner.engine.calibrate import Cancelled, ProgressFn
from pruner.engine.memory_plan import check_whole_model, model_config
from pruner.predictor.compounding import COMPOUNDING_PROBES
from pruner.predictor.measure import build_damage_table, measure_compounding
from pruner.predictor.table import DamageTable, PredictorSpec, save_compounding
from pruner.specs import StatsSpec


def predictor_dir(spec: PredictorSpec, cache_dir: Path | None = None) -> Path:
    from pruner.store.layout import CacheLayout

    return CacheLayout.at(cache_dir).predictor(spec.key())


def cached_table(spec: PredictorSpec, cache_dir: Path | None = None) -> DamageTable | None:
    folder = predictor_dir(spec, cache_dir)
    return DamageTable.load(folder, key=spec.key()) if (folder / "meta.json").is_file() else None


def table_for(stats: StatsSpec, sparsity: float, cache_dir: Path | None = None) -> DamageTable | None:
    """The cached table that predicts allocations at ``sparsity`` best: the operating-point table at that S, else
    the dense-reference one, else None (nothing is built here)."""
    return (cached_table(PredictorSpec(stats, around=float(sparsity)), cache_dir)
            or cached_table(PredictorSpec(stats), cache_dir))


def get_damage_table(spec: PredictorSpec, cache_dir: Path | None = None, *, data_dir=None, loaded=None,
                     progress: ProgressFn | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> DamageTable:
    """The cached table for ``spec``, built (statistics first when missing) and cached when there is none."""
    from pruner.engine.artifacts import get_stats
    from pruner.model.loading import load_model
    from pruner.store.files import atomic_dir

    found = cached_table(spec, cache_dir)
    if found is not None and found.compounding is not None:
        return found
    if loaded is None:
        check_whole_model(model_config(spec.stats.model, cache_dir), "damage table", spec.stats.model.name,
                          dtype_bytes=4 if spec.stats.model.dtype == "float32" else 2, batch_size=spec.windows,
                          seqlen=spec.window_tokens, ways=["fewer held-out windows (--windows)",
                                                           "shorter ones (--window-tokens)"])
    loaded = loaded if loaded is not None else load_model(spec.stats.model, cache_dir)
    if loaded.streamed:
        raise ValueError("the damage table is built with the model in memory; load it without streaming")
    stats = get_stats(spec.stats, cache_dir, loaded=loaded)
    blocks = len(stats.block_numel)
    steps = (0 if found is not None else blocks) + COMPOUNDING_PROBES  # progress: table blocks, then probes

    def report(done_before: int):
        return None if progress is None else (lambda done, _total: progress(done_before + done, steps))

    if found is None:
        table = build_damage_table(loaded.model, loaded.tokenizer, stats, spec, data_dir, loaded.device,
                                   progress=report(0), should_cancel=should_cancel)
    else:  # a table cached before the compounding fit existed: only the probes are measured
        table = found
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled before the compounding fit's probes")
    table.compounding = measure_compounding(table, loaded.model, loaded.tokenizer, stats, spec, data_dir,
                                            loaded.device, progress=report(steps - COMPOUNDING_PROBES))
    if found is None:
        with atomic_dir(predictor_dir(spec, cache_dir)) as tmp:
            table.save(tmp)
    else:
        save_compounding(predictor_dir(spec, cache_dir), table.compounding)
    return table
