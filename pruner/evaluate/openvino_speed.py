"""CPU speed and 8-bit accuracy in OpenVINO, whose CPU plugin turns sparsity into speed with **sparse weights
decompression**: at compile time it packs the non-zeros of int8 weight matrices sparser than
``CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE`` and unpacks them inside the matmul kernel, so a memory-bound decode step
reads fewer bytes.

What activates it (OpenVINO 2026.4, checked on an Intel Xeon with AMX; DESIGN.md): int8 weights **and** int8
activations (w8a8: a FakeQuantize on every FullyConnected input), the property set, and a CPU with AMX — the
compiled graph's FullyConnected primitive is then ``brgemm_avx512_amx_sparse_I8`` instead of
``brgemm_avx512_amx_I8``. Weight-only int8 (activations in bf16/f32) never uses it. Hence the mode here:
NNCF post-training quantization (``nncf.quantize``, preset PERFORMANCE = symmetric int8 weights per output
channel and symmetric int8 activations, ``ModelType.TRANSFORMER``) of the same ONNX graphs the DeepSparse path
times. Symmetric weights keep a zero weight exactly zero (an asymmetric zero-point would not), so the pruned
pattern survives the 8-bit step.

* ``amx_status``: whether this CPU has AMX (``amx_int8`` in /proc/cpuinfo). Without it the plugin never packs and a
  "speed-up" would not be the sparsity's: ``measure`` then records the reason and **no** speed-up.
* ``measure``: 8-bit dense and 8-bit pruned graphs compiled (the pruned one with the sparse rate from its
  achieved layer sparsities, ``sparse_rate``), the packed layers counted from the compiled model's runtime graph
  (``packed_layers``), then prefill and one decode step with a KV cache timed exactly as the DeepSparse path
  (``speed_worker.time_interleaved``: warm-up, ≥ 30 calls, dense and pruned in alternating rounds, each round's
  speed-up kept). A speed-up is reported only when the pruned graph has packed layers.
* ``int8_perplexity``: WikiText-2 perplexity of a model after the same 8-bit step (a full-logits graph of one
  evaluation window, quantized the same way), so the 8-bit step's cost sits next to the float perplexity.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

#: The CPU plugin's property: int8 weight matrices with at least this fraction of zeros are packed.
SPARSE_RATE_PROPERTY = "CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE"
#: The /proc/cpuinfo flag of the AMX int8 unit, which the packed kernels (``brgemm_avx512_amx_sparse_I8``) need.
AMX_FLAG = "amx_int8"
#: Calibration windows NNCF collects activation ranges on (real C4 text, not the test split).
CALIBRATION_WINDOWS = 8
#: The float OpenVINO graph must match ONNX Runtime within this fraction of the largest |output| on the timing
#: inputs or the measurement is rejected (the conversion, not the quantization, would be wrong). The 8-bit graph's
#: difference from the float one is reported, not judged (8 bits differ by design; perplexity is the measure).
FLOAT_RTOL = 1e-3
#: Sparse rates are chosen on this grid (a property of a compiled model, kept readable in the manifest).
RATE_STEP = 0.01


def amx_status() -> dict:
    """{"available", "cpu", "reason"}: AMX present (``amx_int8``) or the one-line reason why nothing is timed."""
    from pruner.evaluate.speed_worker import cpu_info

    info = cpu_info()
    cpu = info["cpu"]
    if AMX_FLAG in info["flags"]:
        return {"available": True, "cpu": cpu, "reason": None}
    return {"available": False, "cpu": cpu,
            "reason": f"OpenVINO: this CPU ({cpu}) has no AMX ({AMX_FLAG} missing from /proc/cpuinfo), which "
                      f"OpenVINO's sparse weight decompression needs: no speed-up measured"}


def sparse_rate(layer_sparsity: list[float]) -> float:
    """The compile property's value for a pruned model: the smallest achieved sparsity among its pruned matmul
    layers, rounded down to RATE_STEP, so that every pruned layer is eligible for packing and no unpruned one
    (the output projection, sparsity ≈ 0) is. ValueError when no layer is pruned."""
    pruned = [s for s in layer_sparsity if s > 0]
    if not pruned:
        raise ValueError("the model has no pruned layer: nothing for sparse weight decompression to pack")
    return math.floor(min(pruned) / RATE_STEP + 1e-9) * RATE_STEP


def layer_sparsities(model) -> list[float]:
    """Achieved sparsity of every prunable linear layer inside the blocks."""
    from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix

    out = []
    for block in find_blocks(model)[1]:
        for layer in prunable_layers(block).values():
            w = weight_matrix(layer)
            out.append(float((w == 0).sum()) / w.numel())
    return out


def quantize_w8a8(onnx_path: str | Path, calibration: list[dict], out_xml: str | Path) -> str:
    """ONNX graph → OpenVINO IR with int8 weights and int8 activations (NNCF post-training quantization on the
    ``calibration`` inputs, {input name: array} each); returns the IR's path."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    quantized = nncf.quantize(model, nncf.Dataset(calibration), preset=nncf.QuantizationPreset.PERFORMANCE,
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return str(out_xml)


def int8_weight_zeros(ir_path: str | Path) -> list[float]:
    """Fraction of zeros in every 2-D int8 weight constant of an IR: the pattern the 8-bit step kept (symmetric
    quantization maps a pruned weight to 0; anything that shifted it would leave nothing to pack)."""
    import openvino as ov

    out = []
    for op in ov.Core().read_model(str(ir_path)).get_ops():
        if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8:
            data = op.get_data()
            if data.ndim == 2:
                out.append(float((data == 0).mean()))
    return out


def compile_model(path: str | Path, threads: int, rate: float | None):
    import openvino as ov

    # float32 activations everywhere: on a CPU with native bf16 (AVX512_BF16, AMX) OpenVINO otherwise computes in
    # bf16 by default, which moved the float graph 6e-3 of the largest logit from PyTorch's (Zen 4) and would time
    # dense and sparse in a precision other machines do not use
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
              "INFERENCE_PRECISION_HINT": "f32"}
    if rate is not None:
        config[SPARSE_RATE_PROPERTY] = rate
    return ov.Core().compile_model(str(path), "CPU", config)


def packed_layers(compiled) -> dict:
    """{"fully_connected": n, "int8": n, "sparse": n, "primitives": {type: count}} from the compiled model's runtime
    graph: how many matmul layers run with int8 weights and how many of them in the packed (sparse) format."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if str(info["layerType"].astype(str)) != "FullyConnected":
            continue
        primitive = str(info["primitiveType"].astype(str))
        counts[primitive] = counts.get(primitive, 0) + 1
    return {"fully_connected": sum(counts.values()),
            "int8": sum(n for p, n in counts.items() if p.lower().endswith("i8")),
            "sparse": sum(n for p, n in counts.items() if "sparse" in p.lower()),
            "primitives": counts}


def calibration_feeds(graphs: dict, windows: np.ndarray) -> dict[str, list[dict]]:
    """NNCF calibration inputs per graph from real token windows (n, T + 1): prefill on the first T tokens; decode on
    token T with the KV cache the float prefill graph computes for the first T (ONNX Runtime)."""
    import onnxruntime as ort

    prefill = ort.InferenceSession(graphs["prefill"], providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(graphs["decode"], providers=["CPUExecutionProvider"])
    t = windows.shape[1] - 1
    batch = prefill.get_inputs()[0].shape[0]
    feeds: dict[str, list[dict]] = {"prefill": [], "decode": []}
    for start in range(0, len(windows) - batch + 1, batch):
        ids = windows[start : start + batch].astype(np.int64)
        outs = prefill.run(None, {"input_ids": ids[:, :t]})
        feeds["prefill"].append({"input_ids": ids[:, :t]})
        past = {spec.name: kv for spec, kv in zip(decode.get_inputs()[1:], outs[1:])}
        feeds["decode"].append({"input_ids": ids[:, t : t + 1], **past})
    return feeds


def measure(dense_graphs: dict, pruned_graphs: dict, spec, windows: np.ndarray, rate: float, folder: Path,
            progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Quantize, compile and time dense and pruned graphs (see the module docstring); ``windows``: calibration
    token windows (n, T + 1) with n a multiple of the batch size."""
    import onnxruntime as ort
    import openvino as ov

    from pruner.evaluate.speed_worker import compare, make_inputs, time_interleaved

    step = (lambda name, d, t: progress(name, d, t)) if progress else (lambda *a: None)
    result: dict = {"graphs": {}, "speedup": {}, "speedup_by_round": {}, "packed": {}, "checks": {},
                    "quantization": "w8a8: NNCF post-training quantization, preset PERFORMANCE (symmetric int8 "
                                    "weights per output channel, symmetric int8 activations), model type "
                                    "TRANSFORMER, calibrated on real C4 windows",
                    "sparse_rate": rate, "openvino": ov.__version__}
    models = {"dense": dense_graphs, "pruned": pruned_graphs}
    calibration = {name: calibration_feeds(graphs, windows) for name, graphs in models.items()}
    for i, graph in enumerate(("prefill", "decode")):
        step("quantize and compile", i, 2)
        session = ort.InferenceSession(dense_graphs[graph], providers=["CPUExecutionProvider"])
        inputs = {s.name: x for s, x in zip(session.get_inputs(), make_inputs(session, 0))}
        calls, checks = {}, {}
        for name, graphs in models.items():
            ir = quantize_w8a8(graphs[graph], calibration[name][graph], folder / f"{name}_{graph}_int8.xml")
            # the same property on both: a dense layer is never sparser than the rate, so it changes nothing there
            compiled = compile_model(ir, spec.n_threads, rate)
            reference_session = ort.InferenceSession(graphs[graph], providers=["CPUExecutionProvider"])
            float_out = [np.asarray(v) for v in compile_model(graphs[graph], spec.n_threads, None)(inputs).values()]
            float_check = compare(float_out, reference_session.run(None, inputs), FLOAT_RTOL)
            # the 8-bit step's error on text like the calibration's (random KV caches lie outside its ranges), reported
            text = calibration[name][graph][0]
            quantized_out = [np.asarray(v) for v in compiled(text).values()]
            int8 = compare(quantized_out, reference_session.run(None, text), float("inf"))
            checks[name] = {"float_vs_onnxruntime": float_check,
                            "int8_vs_float": {"max_rel_diff": int8["max_rel_diff"], "same_argmax": int8["same_argmax"]}}
            result["packed"].setdefault(name, {})[graph] = packed_layers(compiled)
            if float_check["ok"]:
                calls[name] = (lambda compiled=compiled: compiled(inputs))
        result["checks"][graph] = checks
        step("timing", i, 2)
        timing = time_interleaved(calls, spec.warmup, spec.runs, spec.rounds) if len(calls) == 2 else {}
        tokens = spec.batch * (spec.seqlen if graph == "prefill" else 1)
        result["graphs"][graph] = {name: {**t, "tokens_per_s": tokens / (t["median_ms"] / 1e3)}
                                   for name, t in timing.items()}
        attributable = timing and result["packed"]["pruned"][graph]["sparse"] > 0
        if attributable:
            dense, pruned = timing["dense"], timing["pruned"]
            result["speedup"][graph] = dense["median_ms"] / pruned["median_ms"]
            result["speedup_by_round"][graph] = [d / p for d, p in zip(dense["round_medians_ms"],
                                                                      pruned["round_medians_ms"])]
        else:
            result["speedup"][graph] = None
            result["speedup_by_round"][graph] = None
    step("timing", 2, 2)
    rejected = [f"{name} {graph}: OpenVINO's float graph differs from ONNX Runtime's by "
                f"{c['float_vs_onnxruntime']['max_rel_diff']:.3g} of the largest output (allowed {FLOAT_RTOL:g})"
                for graph, per in result["checks"].items() for name, c in per.items()
                if not c["float_vs_onnxruntime"]["ok"]]
    result["rejected"] = rejected
    unpacked = [g for g in ("prefill", "decode") if result["packed"]["pruned"][g]["sparse"] == 0]
    result["not_attributable"] = (f"the pruned graph has no packed (sparse) layer in {', '.join(unpacked)} at rate "
                                  f"{rate:g}: no speed-up is reported there" if unpacked else None)
    return result


class CompiledLogits:
    """A compiled full-logits graph behind the call ``perplexity_of_chunks`` makes: model(input_ids=...).logits."""

    def __init__(self, compiled, config):
        self.compiled, self.config = compiled, config

    def __call__(self, input_ids, use_cache=False):
        import torch
        from types import SimpleNamespace

        logits = np.asarray(self.compiled({"input_ids": input_ids.numpy()})[0])
        return SimpleNamespace(logits=torch.from_numpy(logits))


def int8_perplexity(model, tokenizer, data_dir, *, windows: np.ndarray, seqlen: int | None = None,
                    max_chunks: int | None = None, threads: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """WikiText-2 perplexity (``pruner.evaluate.perplexity`` protocol, its evaluation interval) of ``model`` after the
    w8a8 step in OpenVINO: a full-logits graph of one evaluation window exported, quantized on ``windows`` (real
    calibration text, (n, ≥ seqlen)) and compiled; each chunk scored by it."""
    import torch

    from pruner.evaluate.onnx_export import export_score_graph
    from pruner.evaluate.perplexity import check_window, default_seqlen, wikitext2_perplexity

    check_window(model, seqlen)
    seqlen = seqlen or default_seqlen(model)
    with tempfile.TemporaryDirectory(prefix="pruner-openvino-ppl-") as tmp:
        onnx_path = export_score_graph(model, Path(tmp) / "score.onnx", seqlen)
        calibration = [{"input_ids": w[None, :seqlen].astype(np.int64)} for w in windows]
        ir = quantize_w8a8(onnx_path, calibration, Path(tmp) / "score_int8.xml")
        compiled = compile_model(ir, threads or os.cpu_count() or 1, None)
        result = wikitext2_perplexity(CompiledLogits(compiled, model.config), tokenizer, data_dir, seqlen=seqlen,
                                      max_chunks=max_chunks, device=torch.device("cpu"), progress=progress)
    return result | {"quantization": "w8a8 (NNCF PERFORMANCE preset, TRANSFORMER), OpenVINO CPU"}

def calibration_windows(tokenizer, data_dir, count: int, length: int) -> np.ndarray:
    """``count`` windows of ``length`` tokens of the C4 calibration text (seed 0): NNCF's activation ranges come
    from real text, never from the WikiText-2 test split."""
    from pruner.data import c4_token_stream, sample_windows

    return sample_windows(c4_token_stream(tokenizer, data_dir), count, length, seed=0).numpy()


def export_and_measure(dense_model, pruned_model, tokenizer, spec, *, dense_dir: Path | None, data_dir,
                       progress: Callable[[str, int, int], None] | None = None) -> dict:
    """The OpenVINO speed result for a run (the DeepSparse path's layout: ``graphs``, ``speedup``,
    ``speedup_by_round``, ``rejected``; plus ``amx``, ``packed``, ``sparse_rate``). Without AMX it says why in
    ``reason`` and times nothing."""
    from dataclasses import asdict

    from pruner.evaluate.onnx_export import export_graphs
    from pruner.evaluate.speed import dense_graphs_for
    from pruner.evaluate.speed_worker import cpu_info

    amx = amx_status()
    result = {"engine": "openvino", "spec": asdict(spec) | {"threads": spec.n_threads},
              "env": {**cpu_info(), "threads": spec.n_threads}, "amx": amx["available"], "reason": amx["reason"],
              "graphs": {}, "speedup": {"prefill": None, "decode": None},
              "speedup_by_round": {"prefill": None, "decode": None}, "rejected": []}
    if not amx["available"]:
        return result
    phase = (lambda name: (lambda d, t: progress(name, d, t))) if progress else (lambda name: None)
    rate = sparse_rate(layer_sparsities(pruned_model))
    with tempfile.TemporaryDirectory(prefix="pruner-openvino-") as tmp:
        dense = dense_graphs_for(dense_model, dense_dir, spec, Path(tmp), phase("export dense"))
        pruned = export_graphs(pruned_model, Path(tmp) / "pruned", spec, phase("export pruned"))
        windows = calibration_windows(tokenizer, data_dir, CALIBRATION_WINDOWS * spec.batch, spec.seqlen + 1)
        result |= measure(dense, pruned, spec, windows, rate, Path(tmp), progress)
    return result


def int8_perplexities(dense_model, pruned_model, tokenizer, data_dir, *, max_chunks: int | None,
                      seqlen: int | None, threads: int | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> dict:
    """{"dense": result, "pruned": result}: ``int8_perplexity`` of both models under one protocol."""
    from pruner.evaluate.perplexity import default_seqlen

    seqlen = seqlen or default_seqlen(pruned_model)
    windows = calibration_windows(tokenizer, data_dir, CALIBRATION_WINDOWS, seqlen)
    out = {}
    for name, model in (("dense", dense_model), ("pruned", pruned_model)):
        step = (lambda d, t, name=name: progress(f"8-bit perplexity, {name}", d, t)) if progress else None
        out[name] = int8_perplexity(model, tokenizer, data_dir, windows=windows, seqlen=seqlen,
                                    max_chunks=max_chunks, threads=threads, progress=step)
    return out
