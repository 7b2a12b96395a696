"""Zero-shot accuracy (lm-eval, 7 tasks) and DeepSparse CPU speed-up on the bundled SmolLM2: dense vs Wanda with
uniform and OWL allocation.

* ``--zeroshot``: dense and {uniform, owl} × ``--zs-sparsities`` (default 50%, 70%), first ``--limit`` documents
  per task (0 = full sets), through the library (results are stored in each run's manifest and reused).
* ``--speed``: {uniform, owl} × ``--speed-sparsities`` (default 50/70/80%) in DeepSparse, prefill (B × T) and decode
  (one token on a KV cache of T), each against the dense model timed in the same worker call, the two taking turns
  in rounds; the decode speed-up of every round is printed as a range.
Rows are appended to ``--out`` (JSON lines) as soon as they exist. Runs must not overlap other heavy work: the
speed numbers are medians of wall-clock timings on this machine.

Run: `.venv/bin/python -m bench.eval_table --zeroshot --speed [--limit 200] [--seqlen 128]`
"""

import argparse
import json
import time

from bench.common import git_rev, machine
from pruner.evaluate.speed_spec import SpeedSpec
from pruner.evaluate.zeroshot import TASKS
from pruner.model.catalogue import ModelSpec
from pruner.runs import metrics
from pruner.runs.execute import load_run, run_prune
from pruner.specs import CalibSpec, PruneSpec
from pruner.store.files import default_data_dir, read_manifest
from pruner.store.formats import EXPORT_VERSION


def spec(alloc: str, sparsity: float, preset: str, data_dir: str) -> PruneSpec:
    return PruneSpec(model=ModelSpec("smollm2-135m"), calib=CalibSpec.preset(preset, data_dir=data_dir),
                     allocator=alloc, method="wanda", sparsity=sparsity)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--zeroshot", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--limit", type=int, default=200, help="documents per task (0 = full sets)")
    ap.add_argument("--zs-sparsities", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--speed-sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.8])
    ap.add_argument("--allocators", nargs="+", default=["uniform", "owl"])
    ap.add_argument("--seqlen", type=int, default=SpeedSpec.seqlen)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--speed-calls", type=int, default=0,
                    help="also time each run's exported graphs in N separate worker calls (fresh DeepSparse engines) "
                         "and print every call's speed-ups and their median: how much one call's ratio can be trusted")
    ap.add_argument("--out", default="docs/eval_table.jsonl")
    args = ap.parse_args()
    data_dir = str(default_data_dir())
    limit = args.limit or None
    out = open(args.out, "a")

    def emit(row):
        out.write(json.dumps(row) + "\n")
        out.flush()

    emit({"kind": "header", "machine": machine(), "commit": git_rev(), "preset": args.preset, "limit": limit,
          "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"# {machine()}; commit {git_rev()}")
    if args.zeroshot:
        print(f"# zero-shot, first {limit} documents per task" if limit else "# zero-shot, full sets")
        print(f"{'model':<34} " + " ".join(f"{TASKS[t].label:>10}" for t in TASKS) + f" {'mean':>7} {'s':>6}")
        t0 = time.perf_counter()
        dense = metrics.dense_zeroshot(ModelSpec("smollm2-135m"), data_dir, limit=limit)
        rows = [("dense", dense, time.perf_counter() - t0, None)]
        for S in args.zs_sparsities:
            for alloc in args.allocators:
                s = spec(alloc, S, args.preset, data_dir)
                folder = run_prune(s)
                t0 = time.perf_counter()
                r = metrics.evaluate_zeroshot(folder, data_dir, limit=limit)
                rows.append((s.label(), r, time.perf_counter() - t0, s.key()))
        for label, r, secs, key in rows:
            emit({"kind": "zeroshot", "label": label, "run": key, "result": r, "seconds": secs})
            print(f"{label:<34} " + " ".join(f"{r['tasks'][t]['acc'] * 100:>10.1f}" for t in TASKS) +
                  f" {r['mean_acc'] * 100:>7.2f} {secs:>6.0f}")
    if args.speed:
        sp = SpeedSpec(batch=args.batch, seqlen=args.seqlen)
        print(f"# DeepSparse, B={sp.batch}, T={sp.seqlen}, {sp.n_threads} threads, median of {sp.runs}")
        print(f"{'run':<34} {'prefill d/p ms':>16} {'×':>6} {'decode d/p ms':>15} {'×':>6} {'per round':>11} "
              f"{'ideal×':>7}")
        for S in args.speed_sparsities:
            for alloc in args.allocators:
                s = spec(alloc, S, args.preset, data_dir)
                folder = run_prune(s)
                stored = [v for k, v in read_manifest(folder)["metrics"].items() if k.startswith("speed:deepsparse:")
                          and v.get("export_version") == EXPORT_VERSION and v["spec"]["seqlen"] == sp.seqlen
                          and v["spec"]["batch"] == sp.batch and v["spec"]["threads"] == sp.n_threads]
                r = stored[-1] if stored else metrics.evaluate_speed(folder, sp, engine="deepsparse")
                emit({"kind": "speed", "label": s.label(), "run": s.key(), "result": r})
                g = r["graphs"]
                by_round = r["speedup_by_round"]["decode"]
                print(f"{s.label():<34} {g['prefill']['dense']['median_ms']:>7.1f}/{g['prefill']['pruned']['median_ms']:<7.1f}"
                      f" {r['speedup']['prefill']:>6.2f} {g['decode']['dense']['median_ms']:>7.2f}/"
                      f"{g['decode']['pruned']['median_ms']:<6.2f} {r['speedup']['decode']:>6.2f} "
                      f"{min(by_round):>5.2f}–{max(by_round):<5.2f} {r['ideal_decode_speedup_estimate']:>7.2f}",
                      flush=True)

    if args.speed_calls:
        repeated_calls(args, data_dir, emit)


def repeated_calls(args, data_dir: str, emit) -> None:
    """The same exported graphs timed in ``--speed-calls`` separate worker calls (each compiles fresh engines)."""
    import statistics
    import tempfile
    from pathlib import Path

    from pruner.evaluate.onnx_export import export_graphs
    from pruner.evaluate.speed import measure
    from pruner.model.loading import load_model

    sp = SpeedSpec(batch=args.batch, seqlen=args.seqlen)
    print(f"# the same graphs in {args.speed_calls} separate worker calls; decode (prefill) speed-up per call")
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        dense = export_graphs(load_model(ModelSpec("smollm2-135m")).model, Path(tmp) / "dense", sp)
        for S in args.speed_sparsities:
            for alloc in args.allocators:
                s = spec(alloc, S, args.preset, data_dir)
                pruned_model, _ = load_run(run_prune(s))
                pruned = export_graphs(pruned_model, Path(tmp) / "pruned", sp)
                calls = [measure(dense, pruned, sp, engine="deepsparse") for _ in range(args.speed_calls)]
                emit({"kind": "speed_calls", "label": s.label(), "run": s.key(), "export_version": EXPORT_VERSION,
                      "speedup": [c["speedup"] for c in calls],
                      "decode_ms": [[c["graphs"]["decode"][m]["median_ms"] for m in ("dense", "pruned")] for c in calls]})
                decode = [c["speedup"]["decode"] for c in calls]
                prefill = [c["speedup"]["prefill"] for c in calls]
                print(f"{s.label():<34} decode " + " ".join(f"{x:.2f}" for x in decode) +
                      f"  median {statistics.median(decode):.2f} | prefill median {statistics.median(prefill):.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
