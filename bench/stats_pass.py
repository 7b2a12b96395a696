"""Stats pass time ÷ a plain forward pass over the same calibration batches, on the bundled SmolLM2.

Both are measured in the same run, on the same (nsamples × seqlen) tokens and mini-batch size; the plain forward
is the whole causal LM (embeddings, 30 blocks, lm_head) under torch.no_grad. Target: ratio ≤ 1.3.
Also prints the per-block LOD at M = 3, 5, 7. Run: `.venv/bin/python -m bench.stats_pass [--preset cpu]`.
"""

import argparse
import time

import numpy as np

from bench.common import forward_baseline, git_rev, machine, plain_forward
from pruner.engine.stats import collect_stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    lm, calib, tokens, first = forward_baseline(args.preset, args.batch_size)
    rows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain_forward(lm.model, tokens, args.batch_size)
        t_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = collect_stats(lm.model, tokens, lm.device, batch_size=args.batch_size)
        t_stats = time.perf_counter() - t0
        rows.append((t_fwd, t_stats))
    print(f"# stats pass vs plain forward, SmolLM2-135M, {calib.nsamples} × {calib.seqlen} tokens, "
          f"mini-batch {args.batch_size}, device {lm.device}")
    print(f"# machine: {machine()}; commit {git_rev()}")
    print(f"{'run':<4} {'forward s':>10} {'stats s':>10} {'ratio':>7}")
    for i, (f, s) in enumerate(rows):
        print(f"{i:<4} {f:10.2f} {s:10.2f} {s / f:7.3f}")
    best_f, best_s = min(r[0] for r in rows), min(r[1] for r in rows)
    print(f"{'best':<4} {best_f:10.2f} {best_s:10.2f} {best_s / best_f:7.3f}")
    print()
    print("# LOD per block (% of Wanda scores above M × block mean)")
    print("block    M=3    M=5    M=7")
    for b, row in enumerate(np.stack([stats.lod(m) for m in (3, 5, 7)], axis=1) * 100):
        print(f"{b:5d} " + " ".join(f"{v:6.3f}" for v in row))


if __name__ == "__main__":
    main()
