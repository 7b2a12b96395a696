"""Does the searched allocation's lower KL hold on text the search never scored? Its fitness is the KL per token on
the calibration set's first windows (2,048 tokens in the last stage); this scores the allocations of stored Wanda
runs (the search's and the allocators it is compared with) by the same KL on **held-out** C4 windows (a calibration
seed the search did not use), and beside it on the search's own windows.

If the search's allocation is lower on its own windows but not on held-out ones, it fitted its 2,048 tokens
(selection on few tokens); if it is lower on both, the gap between its KL and WikiText-2 perplexity is the one-shot
vs sequential-prune difference.

With ``--sequential`` two more columns score each allocation's **final** Wanda model instead (the masks of the
sequential prune on the seed's whole calibration set, ``pruner.predictor.search.sequential_wanda_norms``: what the
search's ``sequential`` = 1 fitness measures), on the same two window sets: does that KL order the perplexities?

Run: `.venv/bin/python -m bench.search_holdout --seeds 0 1 [--holdout-windows 16] [--sequential]` (stored runs of
uniform, ATP, predicted and search with Wanda at 70%, preset cpu, are read from the cache; nothing is stored).
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import git_rev, machine


def main() -> None:
    from pruner.allocation.registry import SEARCH_STAGE_TOKENS, search_stage_windows
    from pruner.data import calibration_tokens
    from pruner.engine.artifacts import get_stats
    from pruner.model.catalogue import ModelSpec
    from pruner.model.loading import load_model
    from pruner.predictor.fitness import KLFitness
    from pruner.predictor.search import SEARCH_STEP, to_lattice, unit_bounds
    from pruner.evaluate.perplexity import PAPER_SEQLEN
    from pruner.runs.groups import perplexity_result
    from pruner.runs.manifest import list_runs
    from pruner.runs.metrics import perplexity_protocol
    from pruner.specs import CalibSpec, StatsSpec
    from pruner.store.files import default_data_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--holdout-seed-offset", type=int, default=1000, help="held-out windows: calibration seed + this")
    ap.add_argument("--holdout-windows", type=int, default=16, help="held-out windows of the preset's length")
    ap.add_argument("--max-chunks", type=int, default=8, help="the perplexity column's protocol: first N chunks")
    ap.add_argument("--sequential", action="store_true", help="also the KL of each allocation's final Wanda model")
    args = ap.parse_args()
    data_dir = str(default_data_dir())
    loaded = load_model(ModelSpec("smollm2-135m"))
    model = loaded.model
    runs = list_runs(None).runs
    print(f"# {machine()}; commit {git_rev()}; Wanda masks at S = {args.sparsity:g}; KL(dense ‖ pruned) per token")
    final = (" final Wanda model's KL, search's windows | final model's KL, held-out windows |"
             if args.sequential else "")
    print(f"| seed | allocator | KL, search's windows (2,048 tokens) | KL, {args.holdout_windows} held-out windows |"
          f"{final} perplexity (first {args.max_chunks} chunks) |")
    print("|---|---|---|---|---|" + ("---|---|" if args.sequential else ""))
    for seed in args.seeds:
        calib = CalibSpec.preset("cpu", data_dir=data_dir, seed=seed)
        spec = StatsSpec(model=ModelSpec("smollm2-135m"), calib=calib)
        stats = get_stats(spec, loaded=loaded)
        own = calibration_tokens(loaded.tokenizer, calib)
        held = calibration_tokens(loaded.tokenizer, CalibSpec.preset(
            "cpu", data_dir=data_dir, seed=seed + args.holdout_seed_offset))[: args.holdout_windows]
        own_windows = search_stage_windows(own.shape[0], own.shape[1], SEARCH_STAGE_TOKENS)[-1]
        chosen = {}
        for r in runs:
            s = r.raw["spec"]
            if (r.method == "wanda" and abs(r.sparsity - args.sparsity) < 1e-9 and s["calib"]["seed"] == seed
                    and s["calib"]["nsamples"] == calib.nsamples and r.allocator in ("uniform", "atp", "predicted", "search")):
                chosen[r.label] = (np.asarray(r.raw["allocation"]["block_sparsity"]),
                                   perplexity_result(r.metrics, perplexity_protocol(PAPER_SEQLEN, args.max_chunks)))
        n_blocks = len(next(iter(chosen.values()))[0])
        lo, hi = unit_bounds(args.sparsity, 0.15, n_blocks)
        total = int(round(args.sparsity * n_blocks / SEARCH_STEP))
        kl: dict = {label: {} for label in chosen}
        norms: dict = {}  # label → the input norms of its sequential Wanda prune (independent of the windows)
        for name, windows in (("own", own[:own_windows]), ("held", held)):
            fitness = KLFitness(model, stats, windows, (len(windows),), "cpu", SEARCH_STEP)
            try:
                for label, (block, _) in chosen.items():
                    units = to_lattice(block, total, lo, hi)
                    kl[label][name] = fitness(units, 0)
                    if args.sequential:
                        if label not in norms:
                            norms[label] = fitness.sequential_fit(units, own)
                            norms[label].inputs = None  # no child's pass starts from it here
                        fitness.use_fit(norms[label])
                        kl[label]["final " + name] = fitness(units, 0)
                        fitness.use_fit(None)  # the dense norms again
            finally:
                fitness.restore()
        for label in sorted(chosen, key=lambda k: kl[k]["held"]):
            ppl = chosen[label][1]
            final = (f" {kl[label]['final own']:.4f} | {kl[label]['final held']:.4f} |" if args.sequential else "")
            print(f"| {seed} | {label} | {kl[label]['own']:.4f} | {kl[label]['held']:.4f} |{final} "
                  f"{ppl['perplexity'] if ppl else float('nan'):.1f} |", flush=True)

if __name__ == "__main__":
    main()
