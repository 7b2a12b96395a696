"""Perplexity before and after LoRA recovery of pruned SmolLM2 runs, with the recovery's time ratio.

For each (method, allocator, S): the run is pruned (or reused from the cache), LoRA-recovered with the library's
defaults (``pruner.engine.recover``), and both are evaluated on the first ``--max-chunks`` chunks of WikiText-2 test (a
partial estimate, labelled so). The time ratio divides the recovery's wall time by one plain forward pass over
the calibration batches, measured in this run. Rows are appended to ``--out`` as they finish.

Run: `.venv/bin/python -m bench.recover_table [--sparsity 0.7] [--allocators owl uniform] [--steps 100]`
"""

import argparse
import json

from bench.common import forward_baseline, git_rev, machine
from pruner.engine.recover import RECOVER_DEFAULT_STEPS, RecoverSpec
from pruner.runs import metrics
from pruner.runs.execute import recover_run, run_prune
from pruner.specs import PruneSpec
from pruner.store.files import default_data_dir, read_manifest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--allocators", nargs="+", default=["owl"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.7])
    ap.add_argument("--steps", type=int, default=RECOVER_DEFAULT_STEPS)
    ap.add_argument("--max-chunks", type=int, default=8)
    ap.add_argument("--out", default="docs/prune_table.jsonl")
    args = ap.parse_args()
    data_dir = str(default_data_dir())
    lm, calib, _, t_forward = forward_baseline(args.preset)
    print(f"# {machine()}; commit {git_rev()}")
    print(f"# calibration {calib.nsamples}×{calib.seqlen}; plain forward {t_forward:.2f} s; perplexity on the first "
          f"{args.max_chunks} chunks of 2048 tokens")
    print(f"{'run':<28} {'ppl before':>10} {'ppl after':>10} {'loss':>15} {'recover s':>9} {'÷fwd':>6}")
    out = open(args.out, "a")
    for alloc in args.allocators:
        for S in args.sparsities:
            spec = PruneSpec(model=lm.spec, calib=calib, allocator=alloc, method=args.method, sparsity=S)
            parent = run_prune(spec, loaded=lm)
            rspec = RecoverSpec(spec.key(), steps=args.steps)
            folder = recover_run(parent, rspec, data_dir, device=str(lm.device))
            before = metrics.evaluate_perplexity(parent, data_dir, max_chunks=args.max_chunks)
            after = metrics.evaluate_perplexity(folder, data_dir, max_chunks=args.max_chunks)
            rec = read_manifest(folder)["recovery"]
            row = {"kind": "recover", "method": args.method, "allocator": alloc, "sparsity": S, "parent": spec.key(),
                   "key": folder.name, "settings": rec["settings"], "ppl_before": before["perplexity"],
                   "ppl_after": after["perplexity"], "max_chunks": args.max_chunks, "loss_first": rec["loss_first"],
                   "loss_last": rec["loss_last"], "recover_s": rec["seconds"],
                   "recover_over_forward": rec["seconds"] / t_forward, "trainable_params": rec["trainable_params"],
                   "machine": machine(), "commit": git_rev()}
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{spec.label():<28} {row['ppl_before']:10.2f} {row['ppl_after']:10.2f} "
                  f"{row['loss_first']:6.3f}→{row['loss_last']:6.3f} {row['recover_s']:9.0f} "
                  f"{row['recover_over_forward']:6.1f}", flush=True)


if __name__ == "__main__":
    main()
