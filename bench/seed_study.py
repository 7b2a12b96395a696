"""Allocators compared with intervals: prune every (method, allocator, sparsity) for several calibration seeds,
evaluate WikiText-2 perplexity (the full test set unless --max-chunks), and print per (method, sparsity) a ranking
of run groups with their seed intervals and whether neighbours separate (paired by seed).

    python -m bench.seed_study --allocators uniform owl --methods wanda --sparsities 0.7 --seeds 3
    python -m bench.seed_study ... --report      # only print, from the runs already in the cache

Runs are ordinary cached runs (same spec → same key), so the CLI (`prune --seeds 3 --ppl`), the Prune page and
this script share them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from bench.common import git_rev, machine
from pruner.allocation import ALLOCATORS
from pruner.groups import group_runs, ranking
from pruner.metrics import perplexity_metric_name
from pruner.runs import list_runs
from pruner.specs import CalibSpec, ModelSpec, PruneSpec
from pruner.store import default_data_dir
from pruner.workflows import PerplexityOptions, PruneRequest, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--allocators", nargs="+", default=["uniform", "owl"])
    p.add_argument("--methods", nargs="+", default=["wanda"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.7])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--max-chunks", type=int, help="first N chunks only (partial); default: the full test set")
    p.add_argument("--report", action="store_true", help="print from cached runs only; prune nothing")
    args = p.parse_args()
    data_dir = os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
    calib = CalibSpec.preset(args.preset, data_dir=data_dir)
    specs = [PruneSpec(model=ModelSpec("smollm2-135m"), calib=dataclasses.replace(calib, seed=seed),
                       allocator=a, method=m, sparsity=S)
             for m in args.methods for S in args.sparsities for a in args.allocators for seed in range(args.seeds)]
    keys = {s.key() for s in specs}
    protocol = None
    for spec in specs:
        if args.report:
            continue
        result = run(PruneRequest(spec, PerplexityOptions(max_chunks=args.max_chunks), data_dir=data_dir))
        protocol = perplexity_metric_name(result["details"]["perplexity"])
        print(f"{spec.label()}, seed {spec.calib.seed}: perplexity {result['perplexity']:.3f}", flush=True)
    runs = [r for r in list_runs().runs if r.key in keys]
    if protocol is None:  # --report: the protocol the asked-for evaluation would have written
        seqlen = 2048
        protocol = f"perplexity:wikitext2-test:seq{seqlen}" + (f":first{args.max_chunks}" if args.max_chunks else "")
    print(f"# machine: {machine()}; commit {git_rev()}; protocol {protocol}; calibration preset {args.preset}")
    for m in args.methods:
        for S in args.sparsities:
            groups = [g for g in group_runs(runs) if g.first.method == m and g.first.sparsity == S]
            print(f"\n{m} @ {S:.0%}")
            print("| rank | allocator | seeds | perplexity per seed | geometric mean [95% seed interval] | vs the row above |")
            print("|---|---|---|---|---|---|")
            for i, r in enumerate(ranking(groups, protocol)):
                per_seed = ", ".join(f"{p:.1f}" for p in r.summary.by_seed.values())
                vs = r.versus_next.text() if r.versus_next else "–"
                print(f"| {i + 1} | {ALLOCATORS[r.group.first.allocator].label} | {len(r.summary.by_seed)} | "
                      f"{per_seed} | {r.summary.perplexity.text(1)} | {vs} |")


if __name__ == "__main__":
    main()
