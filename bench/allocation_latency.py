"""Allocation update latency from cached statistics (what one slider move costs the server).

For random (M, λ, S) draws on the bundled SmolLM2's 30-block statistics, times (a) OWL alone: lod(M) plus the
OWL formula and expansion to 210 layers, and (b) all five allocators, as the Allocation page redraws them.
Target: p95 ≤ 20 ms. With --predict also one prediction from the damage table (target ≤ 5 ms) and everything a
slider move makes the Allocation page compute with a table. Run:
`.venv/bin/python -m bench.allocation_latency [--draws 2000] [--preset cpu --predict]`.
"""

import argparse
import time

import numpy as np

from bench.common import git_rev, machine
from pruner.allocation import allocate, formula_allocators, owl_lambda_max
from pruner.engine import artifacts
from pruner.model.catalogue import ModelSpec
from pruner.specs import CalibSpec, StatsSpec
from pruner.store.files import default_data_dir


def time_updates(stats, draws: int, seed: int = 0) -> dict[str, list[float]]:
    """Milliseconds per update for ``draws`` random (M, S, λ): "owl" (OWL alone) and "all" (every formula
    allocator, λ and M given to those that take them), from the cached statistics."""
    from pruner.allocation import ALLOCATORS

    rng = np.random.default_rng(seed)
    names = formula_allocators()
    times: dict[str, list[float]] = {"owl": [], "all": []}
    for _ in range(draws):
        m = float(rng.uniform(1, 20))
        S = float(rng.uniform(0.1, 0.9))
        lod = stats.lod(m)
        lam = float(rng.uniform(0, 0.99)) * min(0.2, owl_lambda_max(lod, S), owl_lambda_max(lod, S, inverse=True))
        t0 = time.perf_counter()
        allocate("owl", stats, S, lam=lam, m=m)
        t1 = time.perf_counter()
        for name in names:
            try:
                allocate(name, stats, S, **ALLOCATORS[name].pick({"lam": lam, "m": m}))
            except ValueError:  # a default out of range at this S (ATP's δ at low S), as the page reports it
                pass
        t2 = time.perf_counter()
        times["owl"].append((t1 - t0) * 1e3)
        times["all"].append((t2 - t1) * 1e3)
    return times


#: The OWL (λ, M) map of the Allocation page: λ 0 … 0.2 in steps of 0.02 and these M.
MAP_LAMBDAS = np.round(np.arange(0.0, 0.205, 0.02), 3)
MAP_MS = (2.0, 3.0, 5.0, 7.0, 10.0, 15.0)


def time_predictions(stats, table, draws: int, seed: int = 0) -> dict[str, list[float]]:
    """Milliseconds for "predict" (one prediction of an OWL allocation from the damage table) and "page" (what a
    slider move makes the Allocation page compute with a table: every formula allocator and its prediction, and the
    OWL (λ, M) map of predictions), for random S and λ."""
    from pruner.allocation import ALLOCATORS

    rng = np.random.default_rng(seed)
    names = formula_allocators()
    times: dict[str, list[float]] = {"predict": [], "page": []}
    for _ in range(draws):
        S = float(table.anchor) if table.anchor else float(rng.uniform(0.3, 0.8))  # a table around S serves S
        lod = stats.lod(5.0)
        lam = float(rng.uniform(0, 0.99)) * min(0.2, owl_lambda_max(lod, S), owl_lambda_max(lod, S, inverse=True))
        owl = allocate("owl", stats, S, lam=lam, m=5.0)
        t0 = time.perf_counter()
        table.predict(owl.block_sparsity)
        t1 = time.perf_counter()
        for name in names:
            try:
                table.predict(allocate(name, stats, S, **ALLOCATORS[name].pick({"lam": lam, "m": 5.0})).block_sparsity)
            except ValueError:  # out of range at this S, as the page reports it
                pass
        for m in MAP_MS:
            for lam_ in MAP_LAMBDAS:
                try:
                    table.predict(allocate("owl", stats, S, lam=float(lam_), m=m).block_sparsity)
                except ValueError:
                    pass
        t2 = time.perf_counter()
        times["predict"].append((t1 - t0) * 1e3)
        times["page"].append((t2 - t1) * 1e3)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--predict", action="store_true",
                    help="also time predictions from the cached damage table of these statistics (built first when "
                         "missing: `pruner predict`)")
    args = ap.parse_args()
    spec = StatsSpec(ModelSpec("smollm2-135m", device="cpu"), CalibSpec.preset(args.preset, data_dir=str(default_data_dir())))
    stats = artifacts.get_stats(spec)
    times = time_updates(stats, args.draws)
    if args.predict:
        from pruner.predictor.cache import table_for

        table = table_for(spec, 0.7)  # the table around 70% when built, else the dense-reference one
        if table is None:
            raise SystemExit(f"no damage table for these statistics yet: `python -m pruner predict --preset "
                             f"{args.preset} --sparsity 0.7 --around` builds it")
        times.update(time_predictions(stats, table, max(1, args.draws // 10)))
    print(f"# allocation latency, {stats.n_blocks} blocks / {len(stats.layer_names)} layers, {args.draws} draws")
    print(f"# machine: {machine()}; commit {git_rev()}")
    print(f"{'update':<10} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for k, v in times.items():
        print(f"{k:<10} {np.percentile(v, 50):8.3f} {np.percentile(v, 95):8.3f} {np.max(v):8.3f}")


if __name__ == "__main__":
    main()
