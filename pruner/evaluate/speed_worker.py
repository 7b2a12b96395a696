"""Times ONNX graphs in DeepSparse and ONNX Runtime; runs as a plain script in whichever Python is given.

This file imports nothing from ``pruner``: it is run by the DeepSparse virtual environment's own Python (deepsparse
1.8.0 needs numpy < 2 and onnx < 1.15, which the project's environment does not have), or by the project's Python
for ONNX Runtime alone. It reads one JSON request on stdin and writes one JSON answer on stdout:

request  {"models": {"dense": {"prefill": path, "decode": path}, "pruned": {...}}, "engines": ["deepsparse",
          "onnxruntime"], "threads": 2, "warmup": 5, "runs": 30, "rounds": 5, "seed": 0, "rtol": 1e-3}
answer   {"env": {...versions, cpu, flags}, "results": {model: {graph: {"inputs": {...}, engine: {timing},
          "check": {...}}}}}

Every DeepSparse measurement is preceded by a check that its outputs equal ONNX Runtime's on the same inputs
(max |difference| ≤ rtol × max |ONNX Runtime output| for every output, and the same arg-max token); a graph that
fails the check gets ``"rejected": reason`` instead of timings. For each graph, the dense and pruned versions on
every engine are timed taking turns (``time_interleaved``), so the speed-up compares the same stretch of time.
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
                    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8") if f in have]
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


def time_interleaved(calls: dict, warmup: int, runs: int, rounds: int) -> dict:
    """Time every callable of ``calls`` ({name: fn}) ``runs`` times or more, alternating between them.

    After ``warmup`` untimed calls each, the callables take turns in ``rounds`` rounds of ⌈runs / rounds⌉ timed
    calls each, so a slow stretch of the machine (another process, a frequency change) lands on all of them rather
    than on whichever happened to be timed then. Every turn starts with one untimed call: the first call after
    switching runs at up to half speed while the previous runtime's threads still spin. Returns, per name, the
    median, 10th and 90th percentile over all timed calls, and each round's median (their spread shows how steady
    the machine was).
    """
    per_round = -(-runs // rounds)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in calls}
    round_medians: dict = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            fn()  # settles the switch from the previous callable, untimed
            batch = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                batch.append(time.perf_counter() - t0)
            times[name] += batch
            round_medians[name].append(statistics.median(batch) * 1e3)
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        out[name] = {"median_ms": statistics.median(ts) * 1e3, "p10_ms": ts[len(ts) // 10] * 1e3,
                     "p90_ms": ts[(9 * len(ts)) // 10] * 1e3, "runs": len(ts), "warmup": warmup,
                     "rounds": rounds, "round_medians_ms": round_medians[name]}
    return out


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
    rounds = int(request.get("rounds", 1))
    env = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
           "threads": threads, **cpu_info()}
    if "deepsparse" in engines:
        import deepsparse

        env["deepsparse"] = deepsparse.__version__
    results: dict = {}
    graph_names = list(dict.fromkeys(g for graphs in request["models"].values() for g in graphs))
    for graph_name in graph_names:
        # every model's version of this graph is prepared and checked first, then all are timed taking turns
        calls: dict = {engine_name: {} for engine_name in engines}  # engine → {model: call}
        for model_name, graphs in request["models"].items():
            if graph_name not in graphs:
                continue
            path = graphs[graph_name]
            print(f"preparing {model_name} {graph_name}", file=sys.stderr, flush=True)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feeds = make_inputs(session, request.get("seed", 0))
            named = {spec.name: x for spec, x in zip(session.get_inputs(), feeds)}
            reference = session.run(None, named)
            entry = {"inputs": {spec.name: list(x.shape) for spec, x in zip(session.get_inputs(), feeds)}}
            if "onnxruntime" in engines:
                calls["onnxruntime"][model_name] = lambda session=session, named=named: session.run(None, named)
            if "deepsparse" in engines:
                from deepsparse import Engine

                batch = int(feeds[0].shape[0])
                t0 = time.perf_counter()
                engine = Engine(path, batch_size=batch, num_cores=threads)
                compile_s = time.perf_counter() - t0
                check = compare(engine.run(feeds), reference, float(request.get("rtol", 1e-3)))
                entry["check"] = check
                entry["deepsparse"] = {"compile_s": compile_s}
                if check["ok"]:
                    calls["deepsparse"][model_name] = lambda engine=engine, feeds=feeds: engine.run(feeds)
                else:
                    entry["deepsparse"]["rejected"] = check["reason"]
            results.setdefault(model_name, {})[graph_name] = entry
        for engine_name, turns in calls.items():  # one engine at a time; within it, the models take turns
            print(f"timing {graph_name} in {engine_name}: {', '.join(turns)} in turn", file=sys.stderr, flush=True)
            for model_name, timing in time_interleaved(turns, warmup, runs, rounds).items():
                results[model_name][graph_name].setdefault(engine_name, {}).update(timing)
        calls = engine = None  # drops this graph's engines before the next graph's are compiled
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
