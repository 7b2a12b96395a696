"""Streamed vs in-memory prune of the bundled SmolLM2 for every method: are the pruned weights identical?

The test suite checks every method on a tiny sharded Llama and SparseGPT on SmolLM2 (its time budget); this
checks every method on SmolLM2 itself. Calibration preset tiny (8 × 128), uniform 50%.

    python -m bench.stream_identity [--methods magnitude wanda sparsegpt admm admm-gradual]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import git_rev, machine
from pruner.store.files import PROJECT_ROOT, default_data_dir


def main() -> None:
    from pruner.methods import METHODS
    from pruner.model.catalogue import ModelSpec
    from pruner.model.streaming import Checkpoint
    from pruner.runs.execute import run_prune
    from pruner.specs import CalibSpec, PruneSpec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    args = ap.parse_args()
    data_dir = str(default_data_dir())
    print("# SmolLM2-135M, uniform 50%, calibration preset tiny: streamed vs in-memory pruned weights")
    print(f"# machine: {machine()}; commit {git_rev()}")
    print("| method | tensors | identical (torch.equal) | largest |difference| | in memory s | streamed s |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        with tempfile.TemporaryDirectory(prefix="stream-identity-") as tmp:
            cache = Path(tmp)
            (cache / "models").symlink_to(PROJECT_ROOT / "cache" / "models")
            spec = PruneSpec(model=ModelSpec("smollm2-135m", device="cpu"),
                             calib=CalibSpec.preset("tiny", data_dir=data_dir), allocator="uniform", method=method,
                             sparsity=0.5)
            t0 = time.perf_counter()
            a = run_prune(spec, cache).rename(cache / "in-memory")
            t1 = time.perf_counter()
            b = run_prune(spec, cache, stream=True)
            t2 = time.perf_counter()
            ca, cb = Checkpoint(a), Checkpoint(b)
            if set(ca.names()) != set(cb.names()):
                raise SystemExit(f"{method}: the two runs store different tensors")
            same, worst = 0, 0.0
            for name in ca.names():
                x, y = ca.read([name])[name], cb.read([name])[name]
                same += torch.equal(x, y)
                worst = max(worst, float((x.float() - y.float()).abs().max()))
            n = len(ca.names())
            print(f"| {method} | {n} | {same} of {n} | {worst:.3g} | {t1 - t0:.0f} | {t2 - t1:.0f} |", flush=True)


if __name__ == "__main__":
    main()
