"""Predicted vs measured perplexity (issue 13): does the damage-table predictor rank allocations as pruning does?

Builds (or reads) the damage table of SmolLM2 around each target sparsity (cpu calibration preset, seed 0; Wanda
masks; held-out WikiText-2 validation windows; `--reference dense`: the first version's dense-reference table), then
for each target sparsity enumerates allocations — uniform, OWL over a (λ, M) grid, its
inverse, DLP over α, ATP over δ, Erdős–Rényi, global, AlphaPruning over ε, and BESA when its allocation is cached —
prunes each with Wanda (ordinary cached runs: the same spec gives the same run key as the CLI) and evaluates
WikiText-2 test perplexity (the first --max-chunks chunks: a partial evaluation, labelled so), and prints per
sparsity the table of predicted vs measured and their Spearman rank correlation (target ≥ 0.9). Allocations the
predictor cannot read (a block sparsity beyond its grid) or whose parameters are out of range are listed as such.

With ``--seeds N`` each allocation is pruned and measured for calibration seeds 0 … N−1 (the statistics, and so
the allocation, of each seed; the prediction stays seed 0's, as a user would see it) and compared by the geometric
mean of its N perplexities: the seed-to-seed noise of one measurement (the check's noise ceiling, see
`bench.predictor_variants`) shrinks by √N. A learned allocation is measured at seeds > 0 only when it was learned
for them already. ``--drop-weights`` keeps only the manifest and metrics of the runs it creates.

    python -m bench.predictor_check --sparsities 0.5 0.7 [--max-chunks 8] [--seeds 3 --drop-weights] [--json out.json]
    python -m bench.predictor_check ... --report   # nothing pruned: only the cached runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

import numpy as np

from bench.common import forward_baseline, git_rev, machine
from pruner.allocation import ALLOCATORS
from pruner.engine.artifacts import allocation_for, cached_learned
from pruner.jobs.workflows import PerplexityOptions, PruneRequest, run
from pruner.model.catalogue import ModelSpec
from pruner.predictor.cache import cached_table, get_damage_table
from pruner.predictor.table import DEFAULT_WINDOW_TOKENS, DEFAULT_WINDOWS, PredictorSpec
from pruner.predictor.tuning import spearman
from pruner.runs.manifest import run_exists, run_folder
from pruner.runs.metrics import stored_perplexity
from pruner.specs import CalibSpec, PruneSpec, StatsSpec
from pruner.store.files import default_data_dir

#: The allocations compared at each S: (allocator, parameters).
CANDIDATES = (
    [("uniform", {}), ("er", {}), ("global", {}), ("owl_inverse", {"lam": 0.08, "m": 5.0})]
    + [("owl", {"lam": lam, "m": m}) for m in (3.0, 5.0, 10.0) for lam in (0.04, 0.08, 0.12, 0.16)]
    + [("dlp", {"alpha": a}) for a in (0.05, 0.1, 0.15, 0.2)]
    + [("atp", {"delta": d}) for d in (0.003, 0.006, 0.01, 0.015)]
    + [("alpha", {"epsilon": e}) for e in (0.1, 0.3)]
    + [("besa", {"beta": 50.0}), ("predicted", {})]
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--max-chunks", type=int, default=8, help="test chunks per measured run (default 8: partial)")
    ap.add_argument("--windows", type=int, default=DEFAULT_WINDOWS)
    ap.add_argument("--window-tokens", type=int, default=DEFAULT_WINDOW_TOKENS)
    ap.add_argument("--reference", choices=["around", "dense"], default="around",
                    help="tables measured around each S (default) or the dense-reference table of the first version")
    ap.add_argument("--seeds", type=int, default=1, help="calibration seeds measured per allocation (default 1)")
    ap.add_argument("--drop-weights", action="store_true",
                    help="keep only the manifest and metrics of the runs this check creates (0.5 GB each)")
    ap.add_argument("--report", action="store_true",
                    help="prune and evaluate nothing: read the measurements from the cached runs (an allocation "
                         "missing a seed's evaluated run is left out, and listed)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    data_dir = os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
    stats_spec = StatsSpec(ModelSpec("smollm2-135m"), CalibSpec.preset(args.preset, data_dir=data_dir))
    forward_s = None

    def table_at(S: float):
        """The table predicting at S (around S unless --reference dense), built and timed when missing."""
        nonlocal forward_s
        spec = PredictorSpec(stats_spec, windows=args.windows, window_tokens=args.window_tokens,
                             around=S if args.reference == "around" else None)
        if cached_table(spec) is None:
            # the table's cost target (≤ 20× a plain forward over the calibration set) is measured in this one run
            if forward_s is None:
                forward_s = forward_baseline(args.preset)[3]
            table = get_damage_table(spec, data_dir=data_dir,
                                     progress=lambda d, t: print(f"# damage table: block {d}/{t}", flush=True))
            print(f"# table {spec.key()} ({len(spec.grid)} grid points) built in {table.meta['seconds']:.1f} s ÷ "
                  f"plain forward over the calibration set {forward_s:.1f} s = "
                  f"{table.meta['seconds'] / forward_s:.1f}× (target ≤ 20×)", flush=True)
        return spec, get_damage_table(spec, data_dir=data_dir)

    print(f"# machine: {machine()}; commit {git_rev()}; tables: {args.reference} reference, {args.windows} × "
          f"{args.window_tokens} validation tokens; measured: Wanda, WikiText-2 test, first {args.max_chunks} chunks "
          "(partial)")
    rows = []
    commit = git_rev()  # of the code this process runs (HEAD may move while it does)
    predictors = {}

    def dump():  # after every row too, so that an interrupted check keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"commit": commit, "reference": args.reference, "predictors": predictors,
                           "max_chunks": args.max_chunks, "seeds": args.seeds, "rows": rows}, f, indent=1,
                          default=lambda v: v.tolist() if isinstance(v, np.ndarray) else str(v))

    for S in args.sparsities:
        spec, table = table_at(S)
        predictors[str(S)] = spec.key()
        print(f"# S = {S:.0%}: predictor {spec.key()} (built in {table.meta['seconds']} s; reference "
              f"{table.dense_perplexity:.3f} on the held-out windows)", flush=True)
        for name, params in CANDIDATES:
            row = {"S": S, "allocator": name, "params": params}
            try:
                if name == "besa" and cached_learned(stats_spec, name, S, params) is None:
                    raise ValueError("not learned at this S (learn it first: `pruner allocate --allocator besa`)")
                _, alloc = allocation_for(stats_spec, name, S, params)
                row["predicted"] = table.predict(alloc.block_sparsity).perplexity
                if table.layer_energy is not None:  # the variant that sees the spread inside blocks
                    row["predicted_layers"] = table.predict_layers(alloc.layer_sparsity).perplexity
            except ValueError as err:
                row["skipped"] = str(err)
                rows.append(row)
                print(f"{S:.0%} {name} {params}: skipped ({err})", flush=True)
                continue
            per_seed = {}
            for seed in range(args.seeds):
                calib = dataclasses.replace(stats_spec.calib, seed=stats_spec.calib.seed + seed)
                if seed and ALLOCATORS[name].learned and cached_learned(dataclasses.replace(stats_spec, calib=calib),
                                                                        name, S, params) is None:
                    row["seeds_missing"] = f"not learned for calibration seed {calib.seed}"
                    break
                prune = PruneSpec(model=stats_spec.model, calib=calib, allocator=name, allocator_params=params,
                                  method="wanda", sparsity=S)
                if args.report:
                    stored = (stored_perplexity(run_folder(prune.key()), max_chunks=args.max_chunks)
                              if run_exists(prune.key()) else None)
                    if stored is None:
                        row["seeds_missing"] = f"no evaluated run for calibration seed {calib.seed}"
                        break
                    per_seed[calib.seed] = stored["perplexity"]
                    continue
                result = run(PruneRequest(prune, PerplexityOptions(max_chunks=args.max_chunks), data_dir=data_dir,
                                          drop_weights=args.drop_weights and not run_exists(prune.key())))
                per_seed[calib.seed] = result["perplexity"]
            if not per_seed:
                rows.append(row)
                print(f"{S:.0%} {name} {params}: {row['seeds_missing']}", flush=True)
                continue
            row["measured_seeds"] = per_seed
            row["measured"] = math.exp(np.mean(np.log(list(per_seed.values()))))  # geometric mean over seeds
            rows.append(row)
            dump()
            print(f"{S:.0%} {name} {params}: predicted {row['predicted']:.2f}, measured {row['measured']:.2f}"
                  + (f" (geometric mean of {len(per_seed)} seeds)" if args.seeds > 1 else "")
                  + (f"; {row['seeds_missing']}" if "seeds_missing" in row else ""), flush=True)
    for S in args.sparsities:
        done = [r for r in rows if r["S"] == S and "measured" in r and "seeds_missing" not in r]
        layers = [r for r in done if "predicted_layers" in r]
        print(f"\n## S = {S:.0%}: {len(done)} allocations, Spearman ρ(predicted, measured) = "
              f"{spearman([r['predicted'] for r in done], [r['measured'] for r in done])[0]:.3f} (block means)"
              + (f", {spearman([r['predicted_layers'] for r in layers], [r['measured'] for r in layers])[0]:.3f} "
                 f"(energy-equivalent block sparsities, {len(layers)} allocations)" if layers else ""))
        print("| allocator | parameters | predicted (block means) | predicted (energy-equivalent) | measured |")
        print("|---|---|---|---|---|")
        for r in sorted(done, key=lambda r: r["measured"]):
            alt = f"{r['predicted_layers']:.2f}" if "predicted_layers" in r else "–"
            print(f"| {r['allocator']} | {r['params']} | {r['predicted']:.2f} | {alt} | {r['measured']:.2f} |")
    dump()


if __name__ == "__main__":
    main()
