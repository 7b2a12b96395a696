"""bf16 / fp16 weights against fp32 on the bundled SmolLM2: perplexity of the dense model and of a Wanda prune.

The spec's dtype (`--dtype`) is the weights' and activations' dtype; norms, Hessians, Wanda's Σx² and the loss
accumulate in float32 or float64 whatever it is. Target (issue 14): bf16 perplexity within 1% of fp32.

    python -m bench.half_precision [--dtypes float32 bfloat16] [--chunks 16] [--preset tiny]

Perplexity is on the first --chunks chunks of WikiText-2 test (a partial evaluation, labelled so), each with its
95% evaluation interval; the ratio is per-chunk paired (same chunks, both dtypes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import git_rev, machine
from pruner.store.files import PROJECT_ROOT, default_data_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    from pruner.core.intervals import Interval, paired_ratio
    from pruner.model.catalogue import ModelSpec
    from pruner.runs import metrics
    from pruner.runs.execute import run_prune
    from pruner.specs import CalibSpec, PruneSpec

    data_dir = str(default_data_dir())
    print(f"# SmolLM2-135M in {', '.join(args.dtypes)}: WikiText-2 test, first {args.chunks} of 148 chunks "
          f"(partial); Wanda + uniform {args.sparsity:.0%}, calibration preset {args.preset}")
    print(f"# machine: {machine()}; commit {git_rev()}")
    print("| model | dtype | perplexity [95% evaluation interval] | ÷ float32 (paired over chunks) | seconds |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="half-precision-") as tmp:
        cache = Path(tmp)
        (cache / "models").symlink_to(PROJECT_ROOT / "cache" / "models")  # the converted bundled model
        reference: dict[str, list[float]] = {}
        # a run is evaluated as `eval` does it: its stored weights (in the spec's dtype) loaded in float32
        label = {"dense": "dense (computed in the dtype)", "pruned": "pruned in the dtype, evaluated in float32"}
        for what in ("dense", "pruned"):
            for dtype in args.dtypes:
                model = ModelSpec("smollm2-135m", dtype=dtype, device="cpu")
                t0 = time.perf_counter()
                if what == "dense":
                    r = metrics.dense_perplexity(model, data_dir, cache, max_chunks=args.chunks)
                else:
                    spec = PruneSpec(model=model, calib=CalibSpec.preset(args.preset, data_dir=data_dir),
                                     allocator="uniform", method="wanda", sparsity=args.sparsity)
                    folder = run_prune(spec, cache)
                    r = metrics.evaluate_perplexity(folder, data_dir, max_chunks=args.chunks)
                seconds = time.perf_counter() - t0
                nll = r["chunk_mean_nll"]
                if dtype == args.dtypes[0]:
                    reference[what] = nll
                ratio = paired_ratio(reference[what], nll, "chunks").ratio.text(4)
                print(f"| {label[what]} | {dtype} | {Interval.from_dict(r['interval']).text(3)} | {ratio} | {seconds:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
