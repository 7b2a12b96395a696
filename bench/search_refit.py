"""The search's sequential refit of a child from its parent's kept block inputs ÷ the same refit from block 0, on the
bundled SmolLM2.

With ``sequential`` = 1 the allocation search (``pruner.predictor.search``) runs a sequential prune of the
calibration set for every child that beat its parent (``pruner.predictor.fitness``): 89% of a search's time on
this machine. A child moved only some blocks, so its pass can start at the latest block whose entering hidden
states the parent's pass kept (every ⌈B ÷ 8⌉-th block) at or before the first block it moved. This prints, for
children whose first moved block is b, both passes' seconds, their ratio, and whether the two gave the same result
bit for bit; a plain forward of the whole model over the same tokens, measured in the same run, gives the scale;
and the share of a pass the search's own children need on average (their first moved blocks drawn as the
search's level switches draw them).

Run: ``.venv/bin/python -m bench.search_refit [--method wanda|sparsegpt] [--firsts 4 16]`` (about 9 minutes on 2
cores with Wanda).
"""

import argparse
import time

import numpy as np

from bench.common import forward_baseline, git_rev, machine

#: Children drawn to estimate where the search's refits start (the share of a pass they run).
DRAWN_CHILDREN = 20_000


def same_bits(a, b) -> bool:
    """Equal bit for bit: tensors, dicts, lists and tuples of them, SparseGPT states by their factor of H⁻¹."""
    import torch

    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b))
    if hasattr(a, "_factor"):
        return same_bits(a._factor(), b._factor())
    return a == b


def expected_share(n_blocks: int, sparsity: float, reach: float, every: int, seed: int = 0) -> float:
    """The mean share of a whole pass a child's refit runs, (B − start) / B, over children drawn by the search's
    mutation from a uniform parent."""
    from pruner.predictor.search import mutate, unit_bounds

    lo, hi = unit_bounds(sparsity, reach, n_blocks)
    parent = np.full(n_blocks, int(round(sparsity * 100)))
    rng, shares = np.random.default_rng(seed), []
    for _ in range(DRAWN_CHILDREN):
        moved = np.flatnonzero(mutate(parent, lo, hi, rng) != parent)
        if len(moved):
            shares.append((n_blocks - moved[0] // every * every) / n_blocks)
    return float(np.mean(shares))


def main():
    from pruner.allocation.registry import search_checkpoint_every, search_stage_windows
    from pruner.engine.artifacts import get_stats
    from pruner.model.catalogue import ModelSpec
    from pruner.predictor.fitness import KLFitness
    from pruner.predictor.search import SEARCH_STEP
    from pruner.specs import StatsSpec

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=("wanda", "sparsegpt"), default="wanda")
    ap.add_argument("--firsts", type=int, nargs="+", default=[4, 16], help="first moved blocks to time")
    ap.add_argument("--sparsity", type=float, default=0.7)
    args = ap.parse_args()
    lm, calib, tokens, t_forward = forward_baseline("cpu")
    stats = get_stats(StatsSpec(ModelSpec("smollm2-135m"), calib), loaded=lm)
    n_blocks = int(np.max(stats.layer_block)) + 1
    windows = search_stage_windows(tokens.shape[0], tokens.shape[1])
    fitness = KLFitness(lm.model, stats, tokens[:windows[-1]], windows, lm.device, SEARCH_STEP, args.method)
    parent = np.full(n_blocks, int(round(args.sparsity / SEARCH_STEP)))
    rows = []
    try:
        t0 = time.perf_counter()
        fitness.use_fit(fitness.sequential_fit(parent, tokens))
        t_parent = time.perf_counter() - t0
        parents = fitness.fit
        for first in args.firsts:
            child = parent.copy()
            child[first] += 1
            child[n_blocks - 1 if first < n_blocks - 1 else first - 1] -= 1
            t0 = time.perf_counter()
            restarted = fitness.sequential_fit(child, tokens)
            t_restart = time.perf_counter() - t0
            fitness.use_fit(None)  # no fit in use: the child's pass from block 0
            t0 = time.perf_counter()
            whole = fitness.sequential_fit(child, tokens)
            t_whole = time.perf_counter() - t0
            rows.append((first, restarted.share_run, t_restart, t_whole, same_bits(restarted.blocks, whole.blocks)))
            del restarted, whole
            fitness.use_fit(parents)
    finally:
        fitness.restore()
    every = search_checkpoint_every(n_blocks)
    print(f"# the search's sequential refit ({args.method}) from the parent's kept block inputs vs from block 0, "
          f"SmolLM2-135M, {calib.nsamples} × {calib.seqlen} tokens, S = {args.sparsity:g}, inputs kept every "
          f"{every} blocks of {n_blocks}, device {lm.device}")
    print(f"# machine: {machine()}; commit {git_rev()}")
    print(f"# plain forward of the whole model over the same tokens: {t_forward:.1f} s; the parent's pass from "
          f"block 0: {t_parent:.1f} s ({t_parent / t_forward:.2f} forwards)")
    print(f"{'first moved':>11} {'starts at':>9} {'share run':>9} {'kept s':>8} {'block 0 s':>9} {'ratio':>6} "
          f"{'same bits':>9}")
    for first, share, t_restart, t_whole, same in rows:
        start = n_blocks - round(share * n_blocks)
        print(f"{first:>11} {start:>9} {share:>9.3f} {t_restart:>8.1f} {t_whole:>9.1f} {t_restart / t_whole:>6.3f} "
              f"{'yes' if same else 'NO':>9}")
    share = expected_share(n_blocks, args.sparsity, 0.15, every)
    print(f"# the search's children (r = 0.15, {DRAWN_CHILDREN:,} drawn): a refit runs {share:.3f} of a pass on "
          f"average (kept every block: {expected_share(n_blocks, args.sparsity, 0.15, 1):.3f})")


if __name__ == "__main__":
    main()
