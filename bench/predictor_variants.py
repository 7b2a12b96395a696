"""How well variants of the damage-table predictor rank the allocations a `bench.predictor_check` run measured.

Reads the check's JSON (its measured perplexities; no pruning here) and the SmolLM2 damage table (built with this
code's defaults when missing), recomputes each allocation, and prints Spearman ρ(predicted, measured) per target
sparsity for:

* **block means**: NLL = NLL_dense + Σ_b Δ_b(s̄_b), s̄_b the block's mean sparsity (``DamageTable.predict``);
* **energy-equivalent**: the same with each block's equivalent sparsity, the uniform one that would remove as much
  squared Wanda score as the allocation's per-layer sparsities (``DamageTable.predict_layers``);
* **energy-equivalent, depth-weighted, fitted on the other S**: NLL = NLL_dense + Σ_b e^{κ·b/(L−1)} Δ_b(g_b), one
  parameter κ (how much a block's damage measured alone over- or under-states its damage inside a pruned model,
  as a function of depth) fitted by least squares of log measured perplexity on the *other* target sparsity's
  allocations (a level and slope free per S), so no allocation is scored by a κ fitted on itself;
* with ``--around``: **operating-point tables**, one per target S, each block's damage measured with every other
  block pruned at S (``PredictorSpec.around``, grid ``operating_grid(S)``), by block means and energy-equivalent.
  Their build time is printed against a plain forward over the calibration set timed in the same run.

    python -m bench.predictor_variants CHECK.json [--around]
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

from bench.common import forward_baseline, git_rev
from pruner.engine.artifacts import get_stats
from pruner.model.catalogue import ModelSpec
from pruner.predictor.cache import get_damage_table
from pruner.predictor.table import PredictorSpec, operating_grid
from pruner.predictor.tuning import spearman
from pruner.runs.manifest import read_run, run_folder
from pruner.specs import CalibSpec, PruneSpec, StatsSpec
from pruner.store.files import default_data_dir

#: κ searched on this grid (e^{±3} ≈ 20× between the first and last block at the ends).
KAPPAS = np.round(np.arange(-3.0, 3.01, 0.05), 2)


def weighted_nll_increase(table, block: np.ndarray, kappa: float) -> float:
    """Σ_b e^{κ·b/(L−1)} Δ_b(g_b), window mean (Δ interpolated as ``DamageTable.predict`` does)."""
    p = table.predict(block)
    depth = np.arange(table.n_blocks) / max(1, table.n_blocks - 1)
    return float((np.exp(kappa * depth) * p.block_delta_nll).sum())


def fit_kappa(table, rows: list[dict]) -> float:
    """κ minimising the squared residual of log(measured) ≈ a + c · (weighted NLL increase) over ``rows``."""
    y = np.log([r["measured"] for r in rows])
    best = None
    for kappa in KAPPAS:
        x = np.array([weighted_nll_increase(table, r["equivalent"], kappa) for r in rows])
        design = np.stack([np.ones_like(x), x], axis=1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        residual = float(((design @ coef - y) ** 2).sum())
        if best is None or residual < best[1]:
            best = (float(kappa), residual)
    return best[0]


def attach_layer_energy(table, spec) -> None:
    """Per-layer removed Wanda-score energies for a table built before they were part of it."""
    from pruner.core.scores import wanda_score
    from pruner.engine.besa import block_input_norms
    from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix
    from pruner.model.loading import load_model
    from pruner.predictor.measure import removed_energy

    stats = get_stats(spec)
    _, blocks = find_blocks(load_model(spec.model).model)
    norms = block_input_norms(stats)
    table.layer_block = np.asarray(stats.layer_block)
    table.layer_energy = np.stack([removed_energy(wanda_score(weight_matrix(prunable_layers(blocks[int(b)])[n]),
                                                              norms[int(b)][n]))
                                   for b, n in zip(table.layer_block, stats.layer_names)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check_json")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--table", help="the key of a cached damage table to read instead (e.g. an older format, whose "
                                    "per-layer energies are then computed from the model here)")
    ap.add_argument("--around", action="store_true",
                    help="also build (or read) an operating-point table at each target S and score it")
    args = ap.parse_args()
    data_dir = os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
    spec = StatsSpec(ModelSpec("smollm2-135m"), CalibSpec.preset(args.preset, data_dir=data_dir))
    if args.table:
        from pruner.predictor.table import DamageTable
        from pruner.store.layout import CacheLayout

        table = DamageTable.load(CacheLayout.at(None).predictor(args.table))
        if table.layer_energy is None:
            attach_layer_energy(table, spec)
    else:
        table = get_damage_table(PredictorSpec(spec), data_dir=data_dir)
    check = json.loads(open(args.check_json).read())
    rows = []
    for r in check["rows"]:
        if "measured" not in r or "seeds_missing" in r:  # a row measured at fewer seeds than the others
            continue
        # the allocation the measured run was pruned with, from its manifest (a learned one is not learned again)
        run = read_run(run_folder(PruneSpec(model=spec.model, calib=spec.calib, allocator=r["allocator"],
                                            allocator_params=r["params"], method="wanda", sparsity=r["S"]).key()))
        row = {**r, "block": np.asarray(run.allocation["block_sparsity"])}
        try:
            row["equivalent"] = table.equivalent_block_sparsity(run.allocation["layer_sparsity"])
            table.predict(row["equivalent"])
        except ValueError as err:
            row["out_of_range"] = str(err)
        rows.append(row)
    print(f"# commit {git_rev()}; predictor {table.meta['key']}; measured by the check at commit {check['commit']} "
          f"(WikiText-2 test, first {check.get('max_chunks', 8)} chunks, partial)")
    print("| S | variant | allocations | Spearman ρ |")
    print("|---|---|---|---|")
    for S in sorted({r["S"] for r in rows}):
        here = [r for r in rows if r["S"] == S]
        usable = [r for r in here if "out_of_range" not in r]
        other = [r for r in rows if r["S"] != S and "out_of_range" not in r]
        block = spearman([table.predict(r["block"]).perplexity for r in here], [r["measured"] for r in here])
        energy = spearman([table.predict(r["equivalent"]).perplexity for r in usable],
                          [r["measured"] for r in usable])
        print(f"| {S:.0%} | block means | {block[1]} | {block[0]:.3f} |")
        print(f"| {S:.0%} | energy-equivalent | {energy[1]} | {energy[0]:.3f} |")
        if other:
            kappa = fit_kappa(table, other)
            weighted = spearman([weighted_nll_increase(table, r["equivalent"], kappa) for r in usable],
                                [r["measured"] for r in usable])
            print(f"| {S:.0%} | energy-equivalent, depth-weighted (κ = {kappa:+.2f} fitted on the other S) | "
                  f"{weighted[1]} | {weighted[0]:.3f} |")
        if args.around:
            _operating_point_lines(spec, data_dir, S, here, args.preset)
        sigma, groups = seed_sigma(S, check.get("max_chunks", 8))
        seeds = check.get("seeds", 1)  # each measurement a geometric mean over this many seeds: noise ÷ √seeds
        if groups:
            print(f"#   noise ceiling at {S:.0%}: seed-to-seed SD of log-perplexity {sigma:.4f} (pooled over {groups} "
                  f"run groups of the same protocol); two replicate measurements of these {len(here)} allocations "
                  f"({seeds} seed{'s' if seeds > 1 else ''} each) would rank alike with Spearman ≈ "
                  f"{noise_ceiling([r['measured'] for r in here], sigma / math.sqrt(seeds)):.3f}")
        for r in here:
            if "out_of_range" in r:
                print(f"#   {S:.0%} {r['allocator']} {r['params']}: not in the energy variants ({r['out_of_range']})")


#: Monte-Carlo draws for the noise ceiling.
CEILING_DRAWS = 2000


def noise_ceiling(measured: list[float], sigma: float, seed: int = 0) -> float:
    """Mean Spearman ρ between two replicate measurements of the same allocations when each log-perplexity carries
    independent noise of standard deviation ``sigma`` (the seed-to-seed spread): what even a perfect predictor's
    ranking could be checked to against one seed's measurements, roughly (its ρ with one replicate is a little
    higher, since the truth is noiseless)."""
    rng = np.random.default_rng(seed)
    log_m = np.log(measured)
    rhos = [spearman(log_m + rng.normal(0, sigma, len(log_m)), log_m + rng.normal(0, sigma, len(log_m)))[0]
            for _ in range(CEILING_DRAWS)]
    return float(np.mean(rhos))


def seed_sigma(S: float, max_chunks: int) -> tuple[float, int]:
    """Pooled within-group standard deviation of log-perplexity over calibration seeds, from the Wanda run groups
    at S in the cache evaluated on the same first ``max_chunks`` chunks (e.g. `bench.seed_study`'s), and the
    number of groups pooled."""
    from pruner.runs.groups import group_runs
    from pruner.runs.manifest import list_runs
    from pruner.runs.metrics import perplexity_protocol

    protocol = perplexity_protocol(2048, max_chunks)
    squares, dof, groups = 0.0, 0, 0
    for g in group_runs(list_runs().runs):
        if g.first.method != "wanda" or g.first.sparsity != S:
            continue
        logs = [math.log(r.metrics[protocol]["perplexity"]) for r in g.runs if protocol in r.metrics]
        if len(logs) >= 2:
            squares += float(np.sum((np.array(logs) - np.mean(logs)) ** 2))
            dof += len(logs) - 1
            groups += 1
    return (math.sqrt(squares / dof) if dof else float("nan")), groups


_forward_s: list[float] = []


def _operating_point_lines(spec, data_dir, S: float, rows: list[dict], preset: str) -> None:
    """Spearman ρ of an operating-point table at S (built here when not cached, timed against a plain forward)."""
    from pruner.predictor.cache import cached_table

    op_spec = PredictorSpec(spec, around=S, grid=operating_grid(S))
    built = cached_table(op_spec) is None
    if built and not _forward_s:  # timed just before the build, on the same idle machine
        _forward_s.append(forward_baseline(preset)[3])
    table = get_damage_table(op_spec, data_dir=data_dir)
    if built:
        print(f"#   operating-point table at {S:.0%} ({len(op_spec.grid)} grid points) built in "
              f"{table.meta['seconds']:.1f} s ÷ plain forward over the calibration set {_forward_s[0]:.1f} s = "
              f"{table.meta['seconds'] / _forward_s[0]:.1f}× (target ≤ 20×)", flush=True)
    for label, field_name in (("block means", "block"), ("energy-equivalent", "equivalent")):
        usable, outside = [], []
        for r in rows:
            if field_name not in r:
                continue
            try:
                usable.append((table.predict(r[field_name]).perplexity, r["measured"]))
            except ValueError:
                outside.append(f"{r['allocator']} {r['params']}")
        rho, n = spearman([u[0] for u in usable], [u[1] for u in usable])
        print(f"| {S:.0%} | operating-point table at {S:.0%}, {label} | {n} | {rho:.3f} |", flush=True)
        if outside:
            print(f"#   outside the operating-point table's range: {'; '.join(outside)}")


if __name__ == "__main__":
    main()
