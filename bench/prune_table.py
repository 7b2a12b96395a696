"""Perplexity of {methods} × {allocators} × {sparsities} on the bundled SmolLM2, with time ratios.

For every combination: prune a copy through the library (runs are cached by spec), evaluate WikiText-2 test
perplexity on the first ``--max-chunks`` chunks of 2048 tokens (a partial estimate, labelled so), and divide the
prune time by a plain forward pass over the same calibration batches measured in this run. Also: perplexity
tokens/s ÷ plain forward tokens/s at the evaluation window, an OWL (M, λ) sweep, and process peak RSS.
Each result is appended to ``--out`` (JSON lines) as soon as it exists, so an interrupted run keeps its rows.

Run: `.venv/bin/python -m bench.prune_table [--preset cpu] [--max-chunks 8]`
"""

import argparse
import json
import time

import torch

from bench.common import forward_baseline, git_rev, machine
from pruner.allocation import ALLOCATORS
from pruner.data import wikitext2_text
from pruner.evaluate.perplexity import chunk_stream, default_seqlen
from pruner.runs import metrics
from pruner.runs.execute import run_prune
from pruner.specs import PruneSpec
from pruner.store.files import default_data_dir


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--max-chunks", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--allocators", nargs="+", default=["uniform", "owl", "global", "er", "owl_inverse"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--sweep", action="store_true", help="also sweep OWL's (M, λ) with wanda at 70%%")
    ap.add_argument("--out", default="docs/prune_table.jsonl")
    args = ap.parse_args()
    data_dir = str(default_data_dir())
    lm, calib, tokens, t_forward = forward_baseline(args.preset)
    seqlen = default_seqlen(lm.model)
    ids = lm.tokenizer(wikitext2_text("test", data_dir), add_special_tokens=False, return_tensors="pt").input_ids[0]
    chunks = chunk_stream(ids, seqlen, 2)
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in chunks:
            lm.model(input_ids=c[None], use_cache=False)
    fwd_tps = chunks.numel() / (time.perf_counter() - t0)
    dense = metrics.dense_perplexity(lm.spec, data_dir, loaded=lm, max_chunks=args.max_chunks)
    out = open(args.out, "a")
    header = {"kind": "header", "machine": machine(), "commit": git_rev(), "preset": args.preset,
              "calib": [calib.nsamples, calib.seqlen], "max_chunks": args.max_chunks, "plain_forward_s": t_forward,
              "plain_forward_tokens_per_s_at_eval_seqlen": fwd_tps, "dense": dense}
    out.write(json.dumps(header) + "\n"); out.flush()
    print(f"# {machine()}; commit {git_rev()}")
    print(f"# calibration {calib.nsamples}×{calib.seqlen}; plain forward {t_forward:.2f} s; perplexity on first "
          f"{args.max_chunks} × {seqlen} tokens; dense {dense['perplexity']:.3f}; eval {dense['tokens_per_second']:.0f} "
          f"tok/s vs plain forward {fwd_tps:.0f} tok/s ({dense['tokens_per_second'] / fwd_tps:.3f}×)")
    print(f"{'method':<10} {'allocator':<12} {'S':>5} {'ppl':>10} {'prune s':>8} {'÷fwd':>6}")
    combos = [(m, a, s, None, None) for m in args.methods for a in args.allocators for s in args.sparsities]
    if args.sweep:
        combos += [("wanda", "owl", 0.7, lam, mm) for mm in (3.0, 5.0, 7.0) for lam in (0.04, 0.08, 0.12)]
    for method, alloc, S, lam, mm in combos:
        given = {k: v for k, v in (("lam", lam), ("m", mm)) if v is not None}
        spec = PruneSpec(model=lm.spec, calib=calib, allocator=alloc, method=method, sparsity=S,
                         allocator_params=ALLOCATORS[alloc].pick(given))
        try:
            folder = run_prune(spec, loaded=lm)
            manifest = json.loads((folder / "manifest.json").read_text())
            stored = manifest["metrics"].get(metrics.perplexity_protocol(seqlen, args.max_chunks))
            r = stored or metrics.evaluate_perplexity(folder, data_dir, max_chunks=args.max_chunks)
            row = {"kind": "run", "method": method, "allocator": alloc, "sparsity": S, "lam": spec.allocator_params.get("lam"), "m": spec.allocator_params.get("m"),
                   "ppl": r["perplexity"], "prune_s": manifest["timings_s"]["prune"],
                   "prune_over_forward": manifest["timings_s"]["prune"] / t_forward,
                   # a learned allocator's (BESA's) learning pass, separate from the pruning pass
                   "learn_s": manifest["timings_s"].get("learn_allocation"),
                   "achieved": manifest["achieved"]["overall"], "key": spec.key(),
                   "peak_rss_gb": manifest["memory"]["process_peak_rss_gb"]}
        except ValueError as err:
            row = {"kind": "run", "method": method, "allocator": alloc, "sparsity": S, "lam": spec.allocator_params.get("lam"), "m": spec.allocator_params.get("m"),
                   "error": str(err)}
        out.write(json.dumps(row) + "\n"); out.flush()
        if "error" in row:
            print(f"{method:<10} {alloc:<12} {S:5.2f} error: {row['error']}")
        else:
            learn = "" if row["learn_s"] is None else (
                "  learned allocation reused from the cache" if row["learn_s"] < 1 else
                f"  learning {row['learn_s']:.0f} s = {row['learn_s'] / t_forward:.1f}× a forward")
            print(f"{method:<10} {alloc:<12} {S:5.2f} {row['ppl']:10.3f} {row['prune_s']:8.1f} "
                  f"{row['prune_over_forward']:6.2f}" + (f"  (λ={lam}, M={mm})" if lam else "") + learn, flush=True)


if __name__ == "__main__":
    main()
