"""Where does the damage-table predictor lose the ranking: in adding single-block damages, or between the table's
setting and a real prune? (issue 13)

For the allocations a `bench.predictor_check` run measured, this measures each *whole* allocation in the table's own
setting (``pruner.predictor.measure.measure_allocations``: every layer at its sparsity with one-shot masks from the cached
statistics, the held-out WikiText-2 validation windows; about one forward of 2,048 tokens each) and prints, per
target S, three Spearman correlations:

* predicted (energy-equivalent, the table's sum of single-block moves) vs **held-out whole allocation**: what
  additivity alone costs;
* held-out whole allocation vs **measured** (sequential Wanda, WikiText-2 test chunks of the check): what the
  table's setting (one-shot masks on dense inputs, 4 × 512 validation tokens) costs;
* predicted vs measured: the check's own number, for reference.

Nothing here reads the test split except the check's stored measurements. Each allocation is the one the seed-0 run
was pruned with (from its manifest).

    python -m bench.predictor_holdout CHECK.json [--sparsities 0.7] [--json out.json]
    python -m bench.predictor_holdout --probe-cost 0.7   # the compounding probes' time ÷ a plain forward

``--probe-cost S`` times, in one process, a plain forward over the calibration set and the measurement of the
compounding fit's probes for the table around S (``pruner.predictor.measure.measure_compounding``; the cached table is read,
its stored fit left alone), and prints the ratio next to the table's own build ratio (from its metadata and this
forward): the predictor's whole cost target is ≤ 20× a plain forward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from bench.common import git_rev, machine
from pruner.engine.artifacts import get_stats
from pruner.model.catalogue import ModelSpec
from pruner.model.loading import load_model
from pruner.predictor.cache import get_damage_table
from pruner.predictor.measure import measure_allocations
from pruner.predictor.table import PredictorSpec
from pruner.predictor.tuning import spearman
from pruner.runs.manifest import read_run, run_folder
from pruner.specs import CalibSpec, PruneSpec, StatsSpec
from pruner.store.files import default_data_dir


def check_rows(check: dict, S: float) -> list[dict]:
    """The check's rows at S measured at every seed it asked for."""
    return [r for r in check["rows"] if abs(r["S"] - S) < 1e-9 and "measured" in r and "seeds_missing" not in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check_json", nargs="?")
    ap.add_argument("--probe-cost", type=float, metavar="S", help="only time the compounding probes at S")
    ap.add_argument("--sparsities", nargs="+", type=float, help="default: every S in the check")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--json", help="also write the rows (with the held-out NLL per window) here")
    args = ap.parse_args()
    data_dir = os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
    stats_spec = StatsSpec(ModelSpec("smollm2-135m"), CalibSpec.preset(args.preset, data_dir=data_dir))
    if args.probe_cost is not None:
        return probe_cost(stats_spec, args.probe_cost, args.preset, data_dir)
    if not args.check_json:
        ap.error("a check's JSON is needed (or --probe-cost S)")
    check = json.loads(open(args.check_json).read())
    loaded = load_model(stats_spec.model)
    stats = get_stats(stats_spec, loaded=loaded)
    out = {"commit": git_rev(), "check_commit": check["commit"], "seeds": check.get("seeds", 1), "rows": []}
    print(f"# machine: {machine()}; commit {out['commit']}; check made at {check['commit']} "
          f"({check.get('seeds', 1)} seed(s), WikiText-2 test, first {check.get('max_chunks', 8)} chunks: partial)")
    for S in args.sparsities or sorted({r["S"] for r in check["rows"]}):
        spec = PredictorSpec(stats_spec, around=S)
        table = get_damage_table(spec, data_dir=data_dir, loaded=loaded)
        rows = []
        for r in check_rows(check, S):
            run = read_run(run_folder(PruneSpec(model=stats_spec.model, calib=stats_spec.calib,
                                                allocator=r["allocator"], allocator_params=r["params"],
                                                method="wanda", sparsity=S).key()))
            layers = np.asarray(run.allocation["layer_sparsity"], dtype=np.float64)
            try:
                predicted = table.predict_layers(layers).perplexity
            except ValueError:  # outside the table's grid (global): measured here all the same
                predicted = None
            rows.append({**r, "layer_sparsity": layers, "predicted_layers": predicted})
        t0 = time.perf_counter()
        nll = measure_allocations(loaded.model, loaded.tokenizer, stats, spec, [r["layer_sparsity"] for r in rows],
                                  data_dir, loaded.device)
        seconds = time.perf_counter() - t0
        for r, w in zip(rows, nll):
            r["holdout_nll"] = w
            r["holdout"] = math.exp(w.mean())
        both = [r for r in rows if r["predicted_layers"] is not None]
        print(f"\n## S = {S:.0%}: {len(rows)} allocations measured on the held-out windows in {seconds:.1f} s "
              f"({seconds / max(1, len(rows)):.1f} s each)")
        print("| comparison | allocations | Spearman ρ |")
        print("|---|---|---|")
        for label, pairs in (
                ("predicted (sum of single-block moves) vs held-out whole allocation",
                 [(r["predicted_layers"], r["holdout"]) for r in both]),
                ("held-out whole allocation vs measured (test)", [(r["holdout"], r["measured"]) for r in rows]),
                ("held-out whole allocation vs measured (test), predictable allocations only",
                 [(r["holdout"], r["measured"]) for r in both]),
                ("predicted vs measured (test)", [(r["predicted_layers"], r["measured"]) for r in both])):
            rho, n = spearman(*zip(*pairs))
            print(f"| {label} | {n} | {rho:.3f} |")
        print("\n| allocator | parameters | predicted | held-out whole | measured |")
        print("|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: r["measured"]):
            p = "–" if r["predicted_layers"] is None else f"{r['predicted_layers']:.1f}"
            print(f"| {r['allocator']} | {r['params']} | {p} | {r['holdout']:.1f} | {r['measured']:.1f} |")
        out["rows"] += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=lambda v: v.tolist() if isinstance(v, np.ndarray) else str(v))


def probe_cost(stats_spec, S: float, preset: str, data_dir: str) -> None:
    from bench.common import forward_baseline
    from pruner.predictor.cache import cached_table
    from pruner.predictor.compounding import COMPOUNDING_PROBES
    from pruner.predictor.measure import measure_compounding

    spec = PredictorSpec(stats_spec, around=S)
    table = cached_table(spec)
    if table is None:
        raise SystemExit(f"no damage table around {S:g} is cached; build it first (`pruner predict --around`)")
    loaded, _, _, forward_s = forward_baseline(preset)
    stats = get_stats(stats_spec, loaded=loaded)
    fit = measure_compounding(table, loaded.model, loaded.tokenizer, stats, spec, data_dir, loaded.device)
    table_s = table.meta["seconds"]
    print(f"# machine: {machine()}; commit {git_rev()}; table {spec.key()} around {S:g}")
    print("| step | seconds | ÷ plain forward over the calibration set |")
    print("|---|---|---|")
    print(f"| plain forward (this run) | {forward_s:.1f} | 1 |")
    print(f"| {COMPOUNDING_PROBES} compounding probes (this run) | {fit['seconds']:.1f} | "
          f"{fit['seconds'] / forward_s:.2f}× |")
    print(f"| the table's build (its metadata, {table.meta['created']}) | {table_s:.1f} | "
          f"{table_s / forward_s:.1f}× (against this run's forward) |")
    print(f"| table + probes | {table_s + fit['seconds']:.1f} | {(table_s + fit['seconds']) / forward_s:.1f}× "
          "(target ≤ 20×) |")
    same = np.allclose(fit["probe_nll"], table.compounding["probe_nll"], rtol=1e-6) if table.compounding else None
    print(f"# probes' NLL equal to the stored fit's: {same}")


if __name__ == "__main__":
    main()
