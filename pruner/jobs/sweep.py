"""Sweeps: a grid over prune specs, expanded to cells and run by an executor (issue 15).

A ``SweepRequest`` holds one base ``PruneSpec`` and the axes to vary: allocators, methods, sparsities, a number of
calibration seeds, and any declared allocator or method parameter (e.g. OWL's λ as ``{"lam": [0.04, 0.08]}``). It
expands to cells (``PruneRequest``s, one per distinct run key) and to the prerequisites the cells share: the dense
statistics of each distinct calibration set and each learned allocation, computed once before the cells that read
them (``prerequisites``).

Two executors take a sweep and put its work into the job table, so the dashboard and ``pruner jobs`` show a sweep
the same way whichever ran it:

* ``LocalExecutor`` (the default; needs nothing): queues the prerequisite jobs first, then the cells, for the
  local worker processes (``pruner.jobs.queue``), which take jobs oldest first.
* ``RayExecutor`` (``pruner.jobs.ray_exec``; ``--ray ADDRESS``): each job becomes a Ray task on an existing cluster.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pruner.allocation import ALLOCATORS, check_sparsity
from pruner.methods import METHODS
from pruner.specs import PruneSpec, spec_from_dict, spec_to_dict


def _declared_param_names() -> set[str]:
    return {p.name for reg in (ALLOCATORS, METHODS) for entry in reg.values() for p in entry.params}


@dataclass(frozen=True)
class SweepRequest:
    """A grid of prune specs around ``base``. Empty axes keep the base's value; ``seeds`` n runs calibration seeds
    base.seed … base.seed + n − 1; ``params`` maps a declared parameter name to its values (it applies to the cells
    whose allocator or method takes it; the others ignore it). ``perplexity``: evaluate each cell afterwards."""

    kind: ClassVar[str] = "sweep"
    base: PruneSpec
    allocators: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    sparsities: tuple[float, ...] = ()
    seeds: int = 1
    params: dict = field(default_factory=dict)
    perplexity: object = None  # pruner.jobs.workflows.PerplexityOptions
    data_dir: str | None = None
    batch_size: int = 4
    stream: bool = False

    def __post_init__(self):
        for name, values, allowed in (("allocators", self.allocators, ALLOCATORS), ("methods", self.methods, METHODS)):
            object.__setattr__(self, name, tuple(values))
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"{name} must be among {', '.join(allowed)}; got {', '.join(map(str, bad))}")
        object.__setattr__(self, "sparsities", tuple(check_sparsity(s) for s in self.sparsities))
        if not (isinstance(self.seeds, int) and self.seeds >= 1):
            raise ValueError(f"seeds must be an integer ≥ 1 (calibration seeds base, base + 1, …); got {self.seeds!r}")
        known = _declared_param_names()
        for name, values in self.params.items():
            if name not in known:
                raise ValueError(f"no allocator or method declares a parameter {name!r}; declared: "
                                 f"{', '.join(sorted(known))}")
            if not values:
                raise ValueError(f"parameter {name!r} needs at least one value")
        object.__setattr__(self, "params", {k: tuple(float(v) for v in vs) for k, vs in self.params.items()})
        self.cells()  # every cell validates now, so a bad grid queues nothing

    # -- expansion ---------------------------------------------------------------------------------------------
    def specs(self) -> list[PruneSpec]:
        """One spec per distinct run, in grid order (allocator, method, sparsity, parameters, seed)."""
        b = self.base
        axes = [self.allocators or (b.allocator,), self.methods or (b.method,), self.sparsities or (b.sparsity,),
                *[[(name, v) for v in values] for name, values in self.params.items()], range(self.seeds)]
        out, seen = [], set()
        for allocator, method, sparsity, *rest in itertools.product(*axes):
            *settings, seed_offset = rest
            a_names = {p.name for p in ALLOCATORS[allocator].params}
            m_names = {p.name for p in METHODS[method].params}
            a_params = dict(b.allocator_params) if allocator == b.allocator else {}
            m_params = dict(b.method_params) if method == b.method else {}
            for name, value in settings:
                if name in a_names:
                    a_params[name] = value
                if name in m_names:
                    m_params[name] = value
            spec = dataclasses.replace(b, allocator=allocator, method=method, sparsity=sparsity,
                                       allocator_params=a_params, method_params=m_params,
                                       calib=dataclasses.replace(b.calib, seed=b.calib.seed + seed_offset))
            if spec.key() not in seen:
                seen.add(spec.key())
                out.append(spec)
        return out

    def cells(self) -> list:
        """The prune requests, one per cell (``pruner.jobs.workflows.PruneRequest``)."""
        from pruner.jobs.workflows import PruneRequest

        out = []
        for spec in self.specs():
            try:
                out.append(PruneRequest(spec, self.perplexity, data_dir=self.data_dir, batch_size=self.batch_size,
                                        stream=self.stream))
            except ValueError as err:
                raise ValueError(f"cell {spec.label()}: {err}") from err
        return out

    def prerequisites(self, cache_dir: Path | None = None) -> list:
        """What the cells share and is not cached yet: statistics per distinct calibration set, then the learned
        allocations (``StatsRequest``, ``LearnRequest``), each once."""
        from pruner.engine.artifacts import cached_learned, load_cached_stats
        from pruner.jobs.workflows import LearnRequest, StatsRequest

        stats, learned = {}, {}
        for spec in self.specs():
            s = spec.stats_spec
            if s.key() not in stats and load_cached_stats(s, cache_dir) is None:
                stats[s.key()] = StatsRequest(s, batch_size=self.batch_size, stream=self.stream)
            if ALLOCATORS[spec.allocator].learned:
                req = LearnRequest(s, spec.allocator, spec.sparsity, spec.allocator_params,
                                   batch_size=self.batch_size, stream=self.stream)
                key = (s.key(), spec.allocator, spec.sparsity, tuple(sorted(spec.allocator_params.items())))
                if key not in learned and cached_learned(s, spec.allocator, spec.sparsity, spec.allocator_params,
                                                         cache_dir) is None:
                    learned[key] = req
        return list(stats.values()) + list(learned.values())

    def jobs(self, cache_dir: Path | None = None) -> list:
        """Prerequisites then cells: the order the executors run them in (``STAGES``)."""
        return self.prerequisites(cache_dir) + self.cells()

    def label(self) -> str:
        specs = self.specs()  # named by its first cell: the base alone lacks the grid's parameter values
        return f"sweep of {len(specs)} cell{'s' if len(specs) != 1 else ''} from {specs[0].label()}"

    # -- serialisation (the Prune page and the CLI build it; a Ray driver reads it back) --------------------------
    def to_dict(self) -> dict:
        return {"base": spec_to_dict(self.base), "allocators": list(self.allocators), "methods": list(self.methods),
                "sparsities": list(self.sparsities), "seeds": self.seeds,
                "params": {k: list(v) for k, v in self.params.items()},
                "perplexity": dataclasses.asdict(self.perplexity) if self.perplexity is not None else None,
                "data_dir": self.data_dir, "batch_size": self.batch_size, "stream": self.stream}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepRequest":
        from pruner.jobs.workflows import PerplexityOptions

        d = dict(d)
        d["base"] = spec_from_dict(d["base"])
        d["perplexity"] = PerplexityOptions(**d["perplexity"]) if d.get("perplexity") else None
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------------
# Executors


class LocalExecutor:
    """Today's queue: the jobs go into the SQLite job table for the local worker processes."""

    name = "local"

    def __init__(self, max_workers: int = 1):
        self.max_workers = max_workers

    def submit(self, store, sweep: SweepRequest, cache_dir: Path | None = None) -> list[int]:
        from pruner.jobs.queue import ensure_workers

        ids = [store.add(r.kind, r.to_dict(), r.label()) for r in sweep.jobs(cache_dir)]
        ensure_workers(store, cache_dir=cache_dir, max_workers=self.max_workers)
        return ids


def executor_for(ray_address: str | None, **ray_settings):
    """The local executor, or the Ray one for ``ray_address`` (ValueError naming what to install without Ray)."""
    if not ray_address:
        return LocalExecutor()
    from pruner.jobs.ray_exec import RayExecutor, RaySettings

    return RayExecutor(RaySettings(address=ray_address, **ray_settings))


def wait_for(store, ids: list[int], *, poll_s: float = 0.5, on_change=None, cache_dir: Path | None = None) -> list:
    """Block until every job in ``ids`` has ended (reaping dead workers meanwhile, and starting a worker, for
    ``cache_dir``, for a local job queued again after its worker died); returns the final jobs. ``on_change(job)``
    is called whenever a job's state, phase or progress changes."""
    import time

    from pruner.jobs.queue import FINAL_STATES, ensure_workers

    last: dict[int, tuple] = {}
    while True:
        if all(store.get(i).executor == "local" for i in ids):
            ensure_workers(store, cache_dir=cache_dir)  # reaps; a job whose worker died is queued again: run it
        else:
            store.reap()
        jobs = [store.get(i) for i in ids]
        for j in jobs:
            now = (j.state, j.phase, j.done, j.total)
            if on_change is not None and last.get(j.id) != now:
                on_change(j)
            last[j.id] = now
        if all(j.state in FINAL_STATES for j in jobs):
            return jobs
        time.sleep(poll_s)
