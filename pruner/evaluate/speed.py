"""CPU inference speed of a dense and a pruned model: ONNX export (``pruner.evaluate.onnx_export``), then
DeepSparse (sparse kernels) timing in its own environment (``pruner.evaluate.deepsparse_env``).

* ``measure`` times dense and pruned graphs in one worker call: warm-up, then the median of ``runs`` ≥ 30 calls,
  dense and pruned taking turns in ``rounds`` rounds, engine compile time separately; DeepSparse's outputs must
  match ONNX Runtime's or the result is rejected.
* Where DeepSparse cannot run, ``measure`` says why, times only the dense graphs in ONNX Runtime and adds
  ``ideal_decode_speedup``: an *estimate* from the weights removed, never a timing of zeroed weights in a dense
  runtime (which would show no speed-up and mean nothing).

DeepSparse is end-of-life (Neural Magic, 2024) and its community licence allows evaluation only, not production.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from pruner.evaluate.deepsparse_env import WORKER, deepsparse_status, last_json, worker_env
from pruner.evaluate.onnx_export import GRAPHS, cached_graphs, export_graphs
from pruner.evaluate.speed_spec import SpeedSpec
from pruner.store.formats import EXPORT_VERSION

#: DeepSparse's outputs must be within this fraction of ONNX Runtime's largest |output| (and give the same arg-max).
OUTPUT_RTOL = 1e-3
STATUS_NOTE = ("DeepSparse is end-of-life (Neural Magic, 2024) and its community licence allows evaluation only, "
               "not production use.")


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def run_worker(python: str, request: dict) -> dict:
    proc = subprocess.run([python, str(WORKER)], input=json.dumps(request), capture_output=True, text=True,
                          env=worker_env())
    if proc.returncode != 0:
        steps = [line for line in proc.stderr.splitlines() if line.startswith("timing ")]
        where = f" while {steps[-1]}" if steps else ""
        if "Segmentation fault" in proc.stderr:  # DeepSparse prints its own crash report, then exits
            raise RuntimeError(f"DeepSparse crashed (segmentation fault){where}; it has crashed on very small "
                               f"shapes (seen with T = 8): try a larger --speed-seqlen")
        raise RuntimeError(f"the speed worker failed (exit {proc.returncode}){where}: {proc.stderr.strip()[-2000:]}")
    return last_json(proc.stdout)


def matmul_weight_counts(model) -> tuple[int, int]:
    """(all, nonzero) weights of the matrix multiplies one decode step reads: every prunable linear layer inside
    the blocks plus the output projection (lm_head, read in full even when tied to the embedding)."""
    from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix

    total = nonzero = 0
    for block in find_blocks(model)[1]:
        for layer in prunable_layers(block).values():
            w = weight_matrix(layer)
            total += w.numel()
            nonzero += int((w != 0).sum())
    head = model.get_output_embeddings().weight
    return total + head.numel(), nonzero + int((head != 0).sum())


def ideal_decode_speedup(model) -> float:
    """Upper estimate of the decode speed-up from sparsity alone: decode at batch 1 is bound by reading the
    weights, so the ideal time scales with the weights still stored; all ÷ nonzero of the decode matmuls.
    An estimate, not a measurement: sparse formats also store indices, and kernels are not ideal."""
    total, nonzero = matmul_weight_counts(model)
    return total / max(nonzero, 1)


def _summarise(entry: dict, engine: str, spec: SpeedSpec, graph: str) -> dict | None:
    timing = entry.get(engine)
    if not timing or "median_ms" not in timing:
        return None
    tokens = spec.batch * (spec.seqlen if graph == "prefill" else 1)
    return {**timing, "tokens_per_s": tokens / (timing["median_ms"] / 1e3)}


def measure(dense_graphs: dict, pruned_graphs: dict | None, spec: SpeedSpec, *, pruned_model=None,
            engine: str = "auto") -> dict:
    """Time the graphs; returns the result that goes into a run's manifest.

    engine: "deepsparse" (error if unavailable), "onnxruntime" (dense timings only), or "auto" (DeepSparse if it
    can run, otherwise ONNX Runtime with the reason recorded).
    """
    if engine not in ("auto", "deepsparse", "onnxruntime"):
        raise ValueError(f"engine must be auto, deepsparse or onnxruntime here (OpenVINO: "
                         f"pruner.evaluate.openvino_speed); got {engine!r}")
    status = deepsparse_status() if engine != "onnxruntime" else {"available": False,
                                                                   "reason": "ONNX Runtime was asked for"}
    if engine == "deepsparse" and not status["available"]:
        raise RuntimeError(status["reason"])
    use_ds = status["available"]
    models = {"dense": dense_graphs}
    if use_ds and pruned_graphs is not None:
        models["pruned"] = pruned_graphs
    request = {"models": models, "engines": ["deepsparse", "onnxruntime"] if use_ds else ["onnxruntime"],
               "threads": spec.n_threads, "warmup": spec.warmup, "runs": spec.runs, "rounds": spec.rounds, "seed": 0,
               "rtol": OUTPUT_RTOL}
    answer = run_worker(status["python"] if use_ds else sys.executable, request)
    timed_engine = "deepsparse" if use_ds else "onnxruntime"
    result = {"engine": timed_engine, "spec": asdict(spec) | {"threads": spec.n_threads}, "env": answer["env"],
              "deepsparse_available": use_ds, "export_version": EXPORT_VERSION, "deepsparse_reason": status["reason"], "note": STATUS_NOTE,
              "raw": answer["results"], "graphs": {}, "speedup": {}, "speedup_by_round": {}}
    for graph in GRAPHS:
        row = {name: _summarise(answer["results"][name][graph], timed_engine, spec, graph)
               for name in answer["results"]}
        row["onnxruntime_dense"] = _summarise(answer["results"]["dense"][graph], "onnxruntime", spec, graph)
        checks = {name: answer["results"][name][graph].get("check") for name in answer["results"]}
        row["checks"] = checks
        result["graphs"][graph] = row
        if use_ds and row.get("dense") and row.get("pruned"):
            result["speedup"][graph] = row["dense"]["median_ms"] / row["pruned"]["median_ms"]
            # dense and pruned took turns: each round's ratio is a speed-up on one stretch of the machine's time
            result["speedup_by_round"][graph] = [d / p for d, p in zip(row["dense"]["round_medians_ms"],
                                                                      row["pruned"]["round_medians_ms"])]
        else:
            result["speedup"][graph] = None
            result["speedup_by_round"][graph] = None
    rejected = [f"{m} {g}: {c['reason']}" for g, r in result["graphs"].items() for m, c in r["checks"].items()
                if c and not c["ok"]]
    result["rejected"] = rejected
    if pruned_model is not None:
        result["ideal_decode_speedup_estimate"] = ideal_decode_speedup(pruned_model)
    return result


def dense_graphs_for(dense_model, dense_dir: Path | None, spec: SpeedSpec, tmp: Path, progress=None) -> dict:
    """The dense model's graphs: those cached in ``dense_dir``, else exported there (atomically: a half-written
    export is never taken for a cached one), or into ``tmp`` when there is no cache folder."""
    dense_graphs = cached_graphs(dense_dir)
    if dense_graphs is not None:
        return dense_graphs
    if dense_model is None:
        raise ValueError(f"no dense graphs cached in {dense_dir}: pass the dense model to export them")
    target = Path(dense_dir) if dense_dir is not None else Path(tmp) / "dense"
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    export_graphs(dense_model, partial, spec, progress)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return cached_graphs(target)


def export_and_measure(dense_model, pruned_model, spec: SpeedSpec, *, dense_dir: Path | None = None,
                       engine: str = "auto", progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Export both models (the dense graphs are reused from ``dense_dir`` when present there; ``dense_model`` may
    then be None) and measure."""
    phase = (lambda name: (lambda d, t: progress(name, d, t))) if progress else (lambda name: None)
    # without DeepSparse the pruned graphs would only be timed on a dense runtime, which says nothing: skip them
    time_pruned = engine == "deepsparse" or (engine == "auto" and deepsparse_status()["available"])
    with tempfile.TemporaryDirectory(prefix="pruner-onnx-") as tmp:
        dense_graphs = dense_graphs_for(dense_model, dense_dir, spec, Path(tmp), phase("export dense"))
        pruned_graphs = (export_graphs(pruned_model, Path(tmp) / "pruned", spec, phase("export pruned"))
                         if time_pruned else None)
        if progress:
            progress("timing", 0, 1)
        result = measure(dense_graphs, pruned_graphs, spec, pruned_model=pruned_model, engine=engine)
        if progress:
            progress("timing", 1, 1)
    return result
