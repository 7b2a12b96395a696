"""The library's front door: what the CLI and the pages call.

Each function takes specs (never argparse namespaces or session state) and an optional cache directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pruner.allocation import Allocation, allocate
from pruner.data import calibration_tokens
from pruner.models import LoadedModel, load_model, model_summary
from pruner.specs import StatsSpec
from pruner.stats import Stats, collect_stats
from pruner.store import atomic_dir, default_cache_dir

ProgressFn = Callable[[int, int], None]


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
) -> Stats:
    """Run the calibration pass on the dense model (does not save; see ``get_stats``)."""
    loaded = loaded if loaded is not None else load_model(spec.model, cache_dir)
    t0 = time.perf_counter()
    tokens = calibration_tokens(loaded.tokenizer, spec.calib)
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
                   m: float | None = None, cache_dir: Path | None = None, **kwargs) -> tuple[Stats, Allocation]:
    """Statistics (cached or computed) and one allocation. Newly computed statistics are saved only if the
    allocation succeeds, so a rejected λ leaves the cache as it was."""
    cached = load_cached_stats(spec, cache_dir)
    stats = cached if cached is not None else compute_stats(spec, cache_dir, **kwargs)
    result = allocate(allocator, stats, sparsity, lam=lam, m=m)
    if cached is None:
        save_stats(spec, stats, cache_dir)
    return stats, result
