"""Times ONNX graphs in DeepSparse and ONNX Runtime; runs as a plain script in whichever Python is given.

This file imports nothing from ``pruner``: it is run by the DeepSparse virtual environment's own Python (deepsparse
1.8.0 needs numpy < 2 and onnx < 1.15, which the project's environment does not have), or by the project's Python
for ONNX Runtime alone. It reads one JSON request on stdin and writes one JSON answer on stdout:

request  {"models": {"dense": {"prefill": path, "decode": path}, "pruned": {...}}, "engines": ["deepsparse",
          "onnxruntime"], "threads": 2, "warmup": 5, "runs": 30, "seed": 0, "rtol": 1e-3}
answer   {"env": {...versions, cpu, flags}, "results": {model: {graph: {"inputs": {...}, engine: {timing},
          "check": {...}}}}}

Every DeepSparse measurement is preceded by a check that its outputs equal ONNX Runtime's on the same inputs
(max |difference| ≤ rtol × max |ONNX Runtime output| for every output, and the same arg-max token); a graph that
fails the check gets ``"rejected": reason`` instead of timings.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # DeepSparse phones home unless told not to

import numpy as np  # noqa: E402


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in have]
                    break
    except OSError:
        pass
    return {"cpu": model, "flags": flags, "logical_cpus": os.cpu_count(), "machine": platform.machine()}


def make_inputs(session, seed: int) -> list[np.ndarray]:
    """Deterministic inputs for every graph input: token ids in [0, vocab) and standard-normal KV tensors."""
    rng = np.random.default_rng(seed)
    vocab = session.get_outputs()[0].shape[-1]
    feeds = []
    for spec in session.get_inputs():
        shape = [int(d) for d in spec.shape]
        if "int64" in spec.type:
            feeds.append(rng.integers(0, vocab, size=shape, dtype=np.int64))
        else:
            feeds.append(rng.standard_normal(shape).astype(np.float32))
    return feeds


def time_calls(fn, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_ms": statistics.median(times) * 1e3, "p10_ms": times[len(times) // 10] * 1e3,
            "p90_ms": times[(9 * len(times)) // 10] * 1e3, "runs": runs, "warmup": warmup}


def compare(ours: list[np.ndarray], reference: list[np.ndarray], rtol: float) -> dict:
    worst = 0.0
    for a, b in zip(ours, reference):
        scale = float(np.abs(b).max()) or 1.0
        worst = max(worst, float(np.abs(a - b).max()) / scale)
    same_token = bool((ours[0].reshape(-1, ours[0].shape[-1]).argmax(-1)
                       == reference[0].reshape(-1, reference[0].shape[-1]).argmax(-1)).all())
    ok = worst <= rtol and same_token
    reason = None if ok else (f"DeepSparse outputs differ from ONNX Runtime's: max relative difference {worst:.3g} "
                              f"(allowed {rtol:g}), same arg-max token: {same_token}")
    return {"max_rel_diff": worst, "same_argmax": same_token, "ok": ok, "reason": reason}


def measure(request: dict) -> dict:
    import onnxruntime as ort

    engines = request["engines"]
    threads, warmup, runs = int(request["threads"]), int(request["warmup"]), int(request["runs"])
    env = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
           "threads": threads, **cpu_info()}
    if "deepsparse" in engines:
        import deepsparse

        env["deepsparse"] = deepsparse.__version__
    results: dict = {}
    for model_name, graphs in request["models"].items():
        for graph_name, path in graphs.items():
            print(f"timing {model_name} {graph_name}", file=sys.stderr, flush=True)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feeds = make_inputs(session, request.get("seed", 0))
            named = {spec.name: x for spec, x in zip(session.get_inputs(), feeds)}
            reference = session.run(None, named)
            entry = {"inputs": {spec.name: list(x.shape) for spec, x in zip(session.get_inputs(), feeds)}}
            if "onnxruntime" in engines:
                entry["onnxruntime"] = time_calls(lambda: session.run(None, named), warmup, runs)
            if "deepsparse" in engines:
                from deepsparse import Engine

                batch = int(feeds[0].shape[0])
                t0 = time.perf_counter()
                engine = Engine(path, batch_size=batch, num_cores=threads)
                compile_s = time.perf_counter() - t0
                check = compare(engine.run(feeds), reference, float(request.get("rtol", 1e-3)))
                entry["check"] = check
                if check["ok"]:
                    entry["deepsparse"] = time_calls(lambda: engine.run(feeds), warmup, runs) | {
                        "compile_s": compile_s}
                else:
                    entry["deepsparse"] = {"rejected": check["reason"], "compile_s": compile_s}
            results.setdefault(model_name, {})[graph_name] = entry
    return {"env": env, "results": results}


def main() -> int:
    request = json.loads(sys.stdin.read())
    if request.get("probe"):
        import deepsparse  # noqa: F401  (the import itself is the probe)

        print(json.dumps({"ok": True, "deepsparse": deepsparse.__version__, "numpy": np.__version__}))
        return 0
    print(json.dumps(measure(request)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
