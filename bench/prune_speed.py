"""Speed and memory of pruning and evaluation on the bundled SmolLM2, as ratios measured in one run.

* prune time ÷ plain forward over the same calibration batches (targets: Wanda ≤ 2.2×, SparseGPT ≤ 3×);
* perplexity tokens/s ÷ plain forward tokens/s at the evaluation window (target ≥ 0.9×); with `--ppl-full`, the
  whole WikiText-2 test through the protocol's entry point (every chunk, per-chunk NLLs and the interval kept)
  against plain forwards over the first chunks before and after it (about 12 minutes here);
* peak RSS of a real `python -m pruner prune` process per method, against the model's fp32 size
  (target ≤ fp32 size + 1 GB).

Run on an otherwise idle machine: `.venv/bin/python -m bench.prune_speed [--preset cpu]`.
"""

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time

import torch

from bench.common import forward_baseline, git_rev, machine
from pruner.allocation import allocate
from pruner.data import wikitext2_text
from pruner.engine.prune import layer_targets, prune_model
from pruner.engine.stats import collect_stats
from pruner.evaluate.perplexity import chunk_stream, default_seqlen, perplexity_of_chunks
from pruner.store.files import PROJECT_ROOT, default_data_dir


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS table")
    ap.add_argument("--ppl-only", action="store_true", help="only the perplexity-throughput ratio")
    ap.add_argument("--ppl-full", action="store_true",
                    help="only the full-test perplexity throughput ÷ plain forward (bracketing forwards)")
    ap.add_argument("--ppl-rounds", type=int, default=3,
                    help="alternating rounds of plain forward and perplexity evaluation (each round's ratio is shown)")
    args = ap.parse_args()
    data_dir = str(default_data_dir())
    if args.rss_only or args.ppl_only or args.ppl_full:
        from pruner.model.catalogue import ModelSpec
        from pruner.model.loading import load_model

        print(f"# machine: {machine()}; commit {git_rev()}")
        lm = load_model(ModelSpec("smollm2-135m"))
        if args.ppl_full:
            return full_perplexity_ratio(lm, data_dir, args.eval_chunks)
        if args.ppl_only:
            return perplexity_ratio(lm, data_dir, args.eval_chunks, args.ppl_rounds)
        return peak_rss_table(lm, args.preset, data_dir)
    lm, calib, tokens, t_fwd = forward_baseline(args.preset)
    stats = collect_stats(lm.model, tokens, lm.device)
    alloc = allocate("owl", stats, 0.7)
    targets = layer_targets(alloc.layer_sparsity, list(zip(stats.layer_block.tolist(), stats.layer_names)), None)
    print(f"# prune and evaluation speed, SmolLM2-135M, calibration {calib.nsamples}×{calib.seqlen}, OWL 70%")
    print(f"# machine: {machine()}; commit {git_rev()}")
    print(f"plain forward over the calibration batches: {t_fwd:.2f} s")
    print(f"{'method':<10} {'prune s':>8} {'÷ forward':>10} {'target':>7}")
    for method, target in (("magnitude", "-"), ("wanda", "≤ 2.2"), ("sparsegpt", "≤ 3.0")):
        model = copy.deepcopy(lm.model)
        t0 = time.perf_counter()
        prune_model(model, tokens, method, targets, "layer" if method == "magnitude" else "row")
        t = time.perf_counter() - t0
        print(f"{method:<10} {t:8.2f} {t / t_fwd:10.3f} {target:>7}")
        del model

    perplexity_ratio(lm, data_dir, args.eval_chunks, args.ppl_rounds)
    peak_rss_table(lm, args.preset, data_dir)


def perplexity_ratio(lm, data_dir, eval_chunks, rounds):
    """Perplexity tokens/s ÷ plain-forward tokens/s on the same chunks, alternating the two; every round is
    printed (single rounds have varied by up to 20% on this machine), and the ratio of the best times."""
    seqlen = default_seqlen(lm.model)
    ids = lm.tokenizer(wikitext2_text("test", data_dir), add_special_tokens=False, return_tensors="pt").input_ids[0]
    chunks = chunk_stream(ids, seqlen, eval_chunks)
    with torch.no_grad():
        lm.model(input_ids=chunks[:1], use_cache=False)
    plain, ppl = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with torch.no_grad():
            for c in chunks:
                lm.model(input_ids=c[None], use_cache=False)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        perplexity_of_chunks(lm.model, chunks, lm.device)
        ppl.append(time.perf_counter() - t0)
    print(f"\nperplexity evaluation, {len(chunks)} × {seqlen} tokens, {rounds} alternating rounds: per-round ratio "
          + ", ".join(f"{a / b:.3f}" for a, b in zip(plain, ppl)))
    print(f"best times: {chunks.numel() / min(ppl):.0f} tok/s vs plain forward {chunks.numel() / min(plain):.0f} tok/s "
          f"→ {min(plain) / min(ppl):.3f}× (target ≥ 0.9)")


def full_perplexity_ratio(lm, data_dir, forward_chunks):
    """The full protocol's throughput (``wikitext2_perplexity`` over the whole test split, as `eval --ppl` runs it)
    ÷ plain-forward throughput over the first ``forward_chunks`` chunks, timed just before and just after it (the
    slower of the two is the baseline, so a machine that slows down during the run does not flatter the ratio)."""
    from pruner.evaluate.perplexity import wikitext2_perplexity

    seqlen = default_seqlen(lm.model)
    ids = lm.tokenizer(wikitext2_text("test", data_dir), add_special_tokens=False, return_tensors="pt").input_ids[0]
    chunks = chunk_stream(ids, seqlen, forward_chunks)

    def plain_seconds() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for c in chunks:
                lm.model(input_ids=c[None], use_cache=False)
        return time.perf_counter() - t0

    plain_seconds()  # warm-up
    before = plain_seconds()
    result = wikitext2_perplexity(lm.model, lm.tokenizer, data_dir, seqlen=seqlen)
    after = plain_seconds()
    plain_rate = chunks.numel() / max(before, after)
    full_rate = result["chunks"] * seqlen / result["seconds"]
    print(f"\nfull WikiText-2 test, {result['chunks']} × {seqlen} tokens in {result['seconds']:.0f} s "
          f"(perplexity {result['perplexity']:.3f}): {full_rate:.0f} tok/s")
    print(f"plain forward, first {len(chunks)} chunks: {chunks.numel() / before:.0f} tok/s before, "
          f"{chunks.numel() / after:.0f} tok/s after → full ÷ slower plain = {full_rate / plain_rate:.3f}× "
          f"(target ≥ 0.9)")


def peak_rss_table(lm, preset, data_dir):
    fp32_gb = sum(p.numel() for p in lm.model.parameters()) * 4 / 2**30
    print(f"\npeak RSS of `python -m pruner prune` (fresh process, OWL 70%), model fp32 size {fp32_gb:.3f} GiB")
    print(f"{'method':<10} {'peak GiB':>9} {'− fp32':>8} {'target':>8}")
    for method in ("magnitude", "wanda", "sparsegpt"):
        with tempfile.TemporaryDirectory() as cache:
            # the converted bundled model is shared through a link so the child does not convert it again
            os.symlink(PROJECT_ROOT / "cache" / "models", f"{cache}/models")
            cmd = [sys.executable, "-c", REPORT_PEAK, "prune", "--method", method, "--allocator", "owl",
                   "--sparsity", "0.7", "--preset", preset, "--cache-dir", cache, "--data-dir", data_dir]
            r = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=PROJECT_ROOT)
            peak = int(r.stderr.strip().splitlines()[-1].split()[-1]) / 2**20
        print(f"{method:<10} {peak:9.3f} {peak - fp32_gb:8.3f} {'≤ 1.000':>8}")


#: Runs the CLI in this process and prints its own peak RSS (KiB) as the last stderr line. The peak is VmHWM of
#: this process's memory map: getrusage's ru_maxrss survives exec on Linux, so a child started from a large parent
#: reports the parent's peak (every method read 2.08 GiB that way, the parent's size).
REPORT_PEAK = (
    "import atexit, sys, runpy\n"
    "def _hwm():\n"
    "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "atexit.register(lambda: print('peak_kib', _hwm(), file=sys.stderr))\n"
    "sys.argv = ['pruner'] + sys.argv[1:]\n"
    "runpy.run_module('pruner', run_name='__main__')\n"
)


if __name__ == "__main__":
    main()
