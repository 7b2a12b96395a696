"""OpenVINO's 8-bit sparse speed-up beside DeepSparse's, and what the 8-bit step costs in perplexity, on the bundled
SmolLM2 pruned with Wanda (uniform allocation) at ``--sparsities`` (default 50% and 70%).

Per run: prefill and decode speed-ups of 8-bit sparse over 8-bit dense in OpenVINO with their round-to-round
spread and the packed layers (only on a CPU with AMX: elsewhere the one line saying why), the DeepSparse speed-up of
the same run where DeepSparse runs, and WikiText-2 perplexity (the first ``--max-chunks`` chunks, a partial
evaluation, with its interval) of the float and 8-bit dense and pruned models.

Run: `.venv/bin/python -m bench.openvino_table [--sparsities 0.5 0.7] [--max-chunks 8] [--seqlen 128]`
"""

from __future__ import annotations

import argparse
import json
import time

from bench.common import git_rev, machine
from pruner.core.intervals import Interval
from pruner.evaluate.deepsparse_env import deepsparse_status
from pruner.evaluate.speed_spec import SpeedSpec
from pruner.jobs.workflows import PerplexityOptions
from pruner.model.catalogue import ModelSpec
from pruner.runs import metrics
from pruner.runs.execute import run_prune
from pruner.specs import CalibSpec, PruneSpec
from pruner.store.files import default_data_dir


def _ppl(p: dict | None) -> str:
    return "—" if p is None else Interval.from_dict(p["interval"]).text()


def _speedup(r: dict, graph: str) -> str:
    value, rounds = r["speedup"].get(graph), (r.get("speedup_by_round") or {}).get(graph)
    if value is None:
        return "—"
    return f"{value:.2f} ({min(rounds):.2f}–{max(rounds):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--max-chunks", type=int, default=8, help="perplexity on the first N WikiText-2 test chunks")
    ap.add_argument("--seqlen", type=int, default=SpeedSpec.seqlen, help="T: prefill length and decode KV cache")
    ap.add_argument("--out", default="docs/openvino_table.jsonl")
    args = ap.parse_args()
    data_dir = str(default_data_dir())
    sp = SpeedSpec(seqlen=args.seqlen)
    ppl_options = PerplexityOptions(max_chunks=args.max_chunks)
    out = open(args.out, "a")
    header = {"kind": "header", "machine": machine(), "commit": git_rev(), "max_chunks": args.max_chunks,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.write(json.dumps(header) + "\n")
    print(f"# {machine()}; commit {git_rev()}; B={sp.batch}, T={sp.seqlen}, {sp.n_threads} threads, median of "
          f"{sp.runs} calls in {sp.rounds} rounds; perplexity on the first {args.max_chunks} chunks (partial)")
    print("| S | OpenVINO decode × (rounds) | prefill × (rounds) | packed layers (prefill, decode) | DeepSparse decode × "
          "| dense float → 8-bit | pruned float → 8-bit |")
    print("|---|---|---|---|---|---|---|")
    ds = deepsparse_status()["available"]
    for sparsity in args.sparsities:
        spec = PruneSpec(model=ModelSpec("smollm2-135m"), calib=CalibSpec.preset(args.preset, data_dir=data_dir),
                         allocator="uniform", method="wanda", sparsity=sparsity)
        folder = run_prune(spec)
        metrics.evaluate_perplexity(folder, data_dir, max_chunks=args.max_chunks)
        t0 = time.perf_counter()
        ov = metrics.evaluate_speed(folder, sp, engine="openvino", data_dir=data_dir, int8_perplexity=ppl_options)
        seconds = time.perf_counter() - t0
        ds_result = metrics.evaluate_speed(folder, sp, engine="deepsparse") if ds else None
        out.write(json.dumps({"kind": "openvino", "run": spec.key(), "label": spec.label(), "result": ov,
                              "seconds": seconds, "deepsparse": ds_result}) + "\n")
        out.flush()
        if not ov["amx"]:
            print(f"# {ov['reason']}")
        packed = ov.get("packed", {}).get("pruned")
        packed_text = (f"{packed['prefill']['sparse']}/{packed['prefill']['fully_connected']}, "
                       f"{packed['decode']['sparse']}/{packed['decode']['fully_connected']}") if packed else "—"
        ppl = ov.get("perplexity", {})
        print(f"| {sparsity:.0%} | {_speedup(ov, 'decode')} | {_speedup(ov, 'prefill')} | {packed_text} | "
              f"{_speedup(ds_result, 'decode') if ds_result else '—'} | "
              f"{_ppl(ppl['dense']['float'])} → {_ppl(ppl['dense']['int8'])} | "
              f"{_ppl(ppl['pruned']['float'])} → {_ppl(ppl['pruned']['int8'])} |", flush=True)


if __name__ == "__main__":
    main()
