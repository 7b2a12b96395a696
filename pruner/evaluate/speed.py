"""CPU inference speed of a dense and a pruned model: ONNX export, then DeepSparse (sparse kernels) timing.

* ``export_graphs`` writes two static-shape ONNX graphs of a causal LM with the torch dynamo exporter (opset 18, IR
  version lowered to 8 for DeepSparse 1.8): **prefill** (B × T token ids → last-position logits and the KV cache) and
  **decode** (B × 1 token ids plus an explicit KV cache of T positions per layer → logits and the new position's
  key and value). At the graph boundary keys are stored transposed, (B, H_kv, d, T), values as (B, H_kv, T, d), so
  the decode step reads the cache in place and never copies it.
* DeepSparse 1.8.0 lives in its own virtual environment (``ensure_deepsparse_env``; it needs numpy < 2 and
  onnx < 1.15) and is driven through ``speed_worker.py`` in a subprocess (JSON in, JSON out; analytics off).
* ``measure`` times dense and pruned graphs in one worker call: warm-up, then the median of ``runs`` ≥ 30 calls,
  dense and pruned taking turns in ``rounds`` rounds, engine compile time separately; DeepSparse's outputs must
  match ONNX Runtime's or the result is rejected.
* Where DeepSparse cannot run, ``measure`` says why, times only the dense graphs in ONNX Runtime and adds
  ``ideal_decode_speedup``: an *estimate* from the weights removed, never a timing of zeroed weights in a dense
  runtime (which would show no speed-up and mean nothing).

DeepSparse is end-of-life (Neural Magic, 2024) and its community licence allows evaluation only, not production.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from pruner.store import PROJECT_ROOT

#: The versions that work together (see DESIGN.md): 1.9.0 is an end-of-life stub that refuses to install, and with
#: numpy 2 DeepSparse 1.8.0 returns wrong logits.
DEEPSPARSE_REQUIREMENTS = ("deepsparse==1.8.0", "onnxruntime", "numpy<2", "onnx<1.15")
#: DeepSparse 1.8.0 publishes wheels for CPython 3.8 to 3.11 only.
DEEPSPARSE_PYTHONS = ((3, 8), (3, 11))
#: DeepSparse 1.8.0's bundled ONNX reader accepts IR version 8; the exporter writes 10 (opset 18 is fine).
DEEPSPARSE_IR_VERSION = 8
ONNX_OPSET = 18
#: Bump when the exported graphs change (part of the cached dense graphs' folder name and of every result).
EXPORT_VERSION = 6
#: The two exported graphs of every model (see ``export_graphs``).
GRAPHS = ("prefill", "decode")
#: A measurement is the median of at least this many timed calls (after warm-up).
MIN_RUNS = 30
#: Dense and pruned take turns in this many rounds of timed calls (see speed_worker.time_interleaved). Timed one
#: after the other, repeated measurements of the same two graphs gave decode ratios from 1.46× to 1.56× on this
#: project's 2-core machine; in turns, every round sees the same machine.
DEFAULT_ROUNDS = 5
#: The exported graphs must reproduce PyTorch within this fraction of its largest |output| (float32 kernels of two
#: runtimes through 30 layers differ by ~1e-4 of the largest logit on SmolLM2 with a random KV cache).
EXPORT_RTOL = 1e-3
#: DeepSparse's outputs must be within this fraction of ONNX Runtime's largest |output| (and give the same arg-max).
OUTPUT_RTOL = 1e-3
WORKER = Path(__file__).with_name("speed_worker.py")
STATUS_NOTE = ("DeepSparse is end-of-life (Neural Magic, 2024) and its community licence allows evaluation only, "
               "not production use.")


@dataclass(frozen=True)
class SpeedSpec:
    """Shapes and timing protocol. ``seqlen`` (T) is the prefill length and the decode step's KV-cache length."""

    batch: int = 1
    seqlen: int = 128
    threads: int | None = None  #: None: all logical CPUs of the machine
    warmup: int = 5
    runs: int = MIN_RUNS
    rounds: int = DEFAULT_ROUNDS  #: dense and pruned alternate in this many rounds of ⌈runs / rounds⌉ calls

    def __post_init__(self):
        if self.batch < 1:
            raise ValueError(f"batch must be ≥ 1, got {self.batch}")
        if self.seqlen < 1:
            raise ValueError(f"seqlen (T) must be ≥ 1, got {self.seqlen}")
        if self.threads is not None and not 1 <= self.threads <= (os.cpu_count() or 1):
            raise ValueError(f"threads must be between 1 and {os.cpu_count()} (this machine's CPUs), got {self.threads}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be ≥ 0, got {self.warmup}")
        if self.runs < MIN_RUNS:
            raise ValueError(f"runs must be ≥ {MIN_RUNS} (a median of fewer calls is too noisy), got {self.runs}")
        if not 1 <= self.rounds <= self.runs:
            raise ValueError(f"rounds must be between 1 and runs ({self.runs}), got {self.rounds}")

    @property
    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def shape_key(self) -> str:
        return f"v{EXPORT_VERSION}-b{self.batch}-t{self.seqlen}"


# ---------------------------------------------------------------------------------------------------------------
# ONNX export


def kv_cache_shapes(model, batch: int, seqlen: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(key shape, value shape) per layer for a KV cache of ``seqlen`` positions, read off a real forward."""

    ids = torch.zeros((batch, seqlen), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return [(tuple(l.keys.shape), tuple(l.values.shape)) for l in out.past_key_values.layers]


#: The attention implementation used while exporting (registered with transformers on first export).
EXPORT_ATTENTION = "pruner_export"
#: While the decode graph is traced: per layer, (past keys transposed (B, H_kv, d, T), past values (B, H_kv, T, d)),
#: the graph's own inputs, which ``grouped_attention`` reads instead of a concatenated cache (see ``_graph_modules``).
_DECODE_PAST: contextvars.ContextVar[list | None] = contextvars.ContextVar("pruner_decode_past", default=None)


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention for export, numerically the eager one: softmax(q kᵀ · scaling + mask) v, in float32 softmax.

    Grouped-query attention without repeating K and V: the query heads that share a KV head are laid side by
    side, (B, H, q, d) → (B, H_kv, n_rep·q, d), so the graph has only reshapes and matmuls. The eager
    implementation's Expand-based repeat (and SDPA's IsNaN/Where guards) are ops DeepSparse 1.8 runs outside its
    engine; measured on SmolLM2 at 70%: decode speed-up 1.27× with eager attention, 1.36× with this.

    While a decode graph is traced (``_DECODE_PAST`` set), ``key``/``value`` are only the new positions and the past
    comes in as graph inputs with the keys already transposed: scores against past and new keys are computed
    separately and joined (B·H·q·(T+q) numbers), and the output is probs_past · V_past + probs_new · V_new. The
    graph then never copies the cache: no per-layer Concat of K and V and no Transpose of K (together 1.2 ms of a
    15 ms 70%-sparse decode step on SmolLM2, the same in dense and pruned graphs).
    """
    if getattr(module, "sinks", None) is not None:
        raise ValueError(f"{type(module).__name__} uses attention sinks, which this ONNX export does not model; "
                         f"speed measurement supports causal LMs with plain softmax attention")
    b, h, q, d = query.shape
    kv_heads = key.shape[1]
    n_rep = h // kv_heads
    grouped = query.reshape(b, kv_heads, n_rep * q, d)
    past = _DECODE_PAST.get()
    if past is None:
        scores = torch.matmul(grouped, key.transpose(2, 3))
    else:
        past_keys_t, past_values = past[module.layer_idx]
        scores = torch.cat([torch.matmul(grouped, past_keys_t), torch.matmul(grouped, key.transpose(2, 3))], dim=-1)
    scores = scores * scaling
    t = scores.shape[-1]
    softcap = kwargs.get("softcap")
    if softcap:
        scores = (scores / softcap).tanh() * softcap
    if attention_mask is not None:
        scores = (scores.reshape(b, kv_heads, n_rep, q, t) + attention_mask[:, :, None, :, :t]).reshape(
            b, kv_heads, n_rep * q, t)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    if past is None:
        out = torch.matmul(probs, value)
    else:
        t_past = past_values.shape[2]
        out = torch.matmul(probs[..., :t_past], past_values) + torch.matmul(probs[..., t_past:], value)
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous(), probs


def _register_export_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EXPORT_ATTENTION, grouped_attention)
    AttentionMaskInterface.register(EXPORT_ATTENTION, eager_mask)  # additive float mask, as eager attention


def _graph_modules(model, n_layers: int):
    """The prefill and decode graphs as modules, plus the decode graph's reference (see ``Decode``).

    KV-cache layout at the graph boundary: keys transposed, (B, H_kv, d, T), values (B, H_kv, T, d), so that the
    decode step's q·Kᵀ reads the cache as it is stored.
    """
    from transformers import Cache, DynamicCache
    from transformers.cache_utils import DynamicLayer

    class NewPositionsLayer(DynamicLayer):
        """A cache layer that holds only the new positions: the past is a graph input read by ``grouped_attention``,
        so updating the cache concatenates nothing."""

        def __init__(self, past_length: int):
            super().__init__()
            self.past_length = past_length

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

        def get_seq_length(self) -> int:
            return self.past_length

    class Prefill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = model

        def forward(self, input_ids):
            out = self.lm(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            return (out.logits, *[t for l in out.past_key_values.layers for t in (l.keys.transpose(2, 3), l.values)])

    class Decode(torch.nn.Module):
        """One step: new token ids + the past cache → logits and the new positions' keys (transposed) and values,
        which the caller appends to its cache (copying the whole cache out on every step is work no serving
        runtime does). ``concatenate=True`` is the reference: a plain transformers cache that concatenates past and
        new, as generation does; the exported graph (False) never copies the cache (see ``grouped_attention``)."""

        def __init__(self, concatenate: bool = False):
            super().__init__()
            self.lm = model
            self.concatenate = concatenate

        def forward(self, input_ids, *past):
            q, past_length = input_ids.shape[1], past[1].shape[2]
            position = torch.arange(past_length, past_length + q).expand_as(input_ids)
            if self.concatenate:
                cache = DynamicCache()
                for i in range(n_layers):
                    cache.update(past[2 * i].transpose(2, 3), past[2 * i + 1], i)
                out = self.lm(input_ids=input_ids, position_ids=position, past_key_values=cache, use_cache=True)
                new = [(l.keys[:, :, -q:], l.values[:, :, -q:]) for l in cache.layers]
            else:
                layers = [NewPositionsLayer(past_length) for _ in range(n_layers)]
                token = _DECODE_PAST.set([(past[2 * i], past[2 * i + 1]) for i in range(n_layers)])
                try:
                    out = self.lm(input_ids=input_ids, position_ids=position, past_key_values=Cache(layers=layers),
                                  use_cache=True)
                finally:
                    _DECODE_PAST.reset(token)
                new = [(l.keys, l.values) for l in layers]
            return (out.logits, *[t for k, v in new for t in (k.transpose(2, 3), v)])

    return Prefill().eval(), Decode().eval(), Decode(concatenate=True).eval()


def fold_weight_transposes(proto) -> int:
    """Replace every Transpose of a stored weight by the transposed weight itself; returns how many.

    A tied output projection (lm_head sharing the embedding matrix) is exported as MatMul(x, Transpose(E)), because
    the embedding lookup needs E untransposed; left alone, a runtime may transpose the whole vocabulary matrix on
    every call. Folding costs one extra copy of that matrix in the file.
    """
    from onnx import numpy_helper

    weights = {w.name: w for w in proto.graph.initializer}
    folded = []
    for node in proto.graph.node:
        if node.op_type == "Transpose" and len(node.input) == 1 and node.input[0] in weights:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(weights[node.input[0]]).transpose(perm)
            proto.graph.initializer.append(numpy_helper.from_array(array.copy(), name=node.output[0]))
            folded.append(node)
    for node in folded:
        proto.graph.node.remove(node)
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    for w in [w for w in proto.graph.initializer if w.name not in used]:
        proto.graph.initializer.remove(w)
    return len(folded)


def reciprocals_as_divisions(proto) -> int:
    """Rewrite every Reciprocal(x) as Div(1, x); returns how many.

    RMSNorm's rsqrt is exported as Sqrt + Reciprocal, and DeepSparse 1.8 runs Reciprocal outside its engine: on
    SmolLM2 that was 61 nodes (3.6% of the decode graph), each splitting the graph; with Div it runs 100% of the
    ops (dense decode 23.8 → 22.4 ms here). The divisor's float type is kept (the 1 is made in the same type).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.value_info,
                                                            *proto.graph.output]}
    types |= {w.name: w.data_type for w in proto.graph.initializer}
    ones: dict[int, str] = {}  # element type → name of the scalar 1 of that type
    nodes, rewritten = [], 0
    for node in proto.graph.node:
        if node.op_type == "Reciprocal":
            rewritten += 1
            elem = types.get(node.input[0], TensorProto.FLOAT)
            if elem not in ones:
                ones[elem] = f"pruner_one_{TensorProto.DataType.Name(elem).lower()}"
                one = np.ones((), dtype=helper.tensor_dtype_to_np_dtype(elem))
                proto.graph.initializer.append(numpy_helper.from_array(one, ones[elem]))
            node = helper.make_node("Div", [ones[elem], node.input[0]], list(node.output), name=f"{node.name}_as_div")
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return rewritten


@contextlib.contextmanager
def rotate_half_as_matmul(model):
    """While exporting, compute the rotary embedding's ``rotate_half`` as one MatMul with a constant matrix.

    transformers' ``rotate_half(x) = cat(−x₂, x₁)`` (x₁, x₂ the two halves of the head dimension) exports as two
    Slices, a Neg and a Concat, four data copies per call that DeepSparse 1.8 runs one by one (0.55 ms of a 15 ms
    SmolLM2 decode step, in dense and pruned alike). The function is linear, so it equals x · R with
    R = rotate_half(I), a signed permutation matrix built with the model's own function: exact in floating point
    (one nonzero ±1 per column), and a MatMul that DeepSparse runs with a sparse kernel. Applies to models whose
    modeling module defines ``rotate_half`` (Llama, Mistral, Qwen2, Gemma, ...); others are exported unchanged.
    """
    module = sys.modules.get(type(model).__module__)
    original = getattr(module, "rotate_half", None)
    if original is None:
        yield
        return

    def rotate_half(x):
        return torch.matmul(x, original(torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)))

    module.rotate_half = rotate_half
    try:
        yield
    finally:
        module.rotate_half = original


def unit_transposes_as_reshapes(proto) -> int:
    """Rewrite every Transpose that only moves axes of length 1 as a Reshape; returns how many.

    Such a transpose keeps every element where it is (the axes longer than 1 stay in order): a decode step's
    (B, 1, H, d) → (B, H, 1, d) head split, for one. DeepSparse 1.8 copies the data for each (0.002 ms apiece, ~100
    per SmolLM2 decode step) and crashes (segmentation fault) on some small ones, e.g. (1, 1, 2, 8) → (1, 2, 1, 8).
    Needs the exporter's static shapes (value_info); a transpose whose input shape is unknown is left alone.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    shapes = {}
    for v in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    shapes |= {w.name: list(w.dims) for w in proto.graph.initializer}
    nodes, rewritten = [], 0
    for node in proto.graph.node:
        shape = shapes.get(node.input[0]) if node.op_type == "Transpose" else None
        if shape is not None:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(shape)))[::-1])
            moved = [axis for axis in perm if shape[axis] != 1]
            if moved == sorted(moved):
                rewritten += 1
                target = f"{node.output[0]}_pruner_shape"
                proto.graph.initializer.append(
                    numpy_helper.from_array(np.array([shape[axis] for axis in perm], dtype=np.int64), target))
                node = helper.make_node("Reshape", [node.input[0], target], list(node.output),
                                        name=f"{node.name}_as_reshape")
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return rewritten


def export_graphs(model, folder: Path, spec: SpeedSpec, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ``prefill.onnx`` and ``decode.onnx`` for ``model`` into ``folder``; returns {graph: path}.

    The graphs are checked against PyTorch on random inputs before they are kept (outputs within 1e-4 of the
    largest |output| × EXPORT_RTOL); a mismatch is an error that names the graph. The model is left as it was.
    """
    model = model.eval()
    previous_attention = model.config._attn_implementation
    # plain matmul + softmax attention without KV repeats (see grouped_attention)
    _register_export_attention()
    model.set_attn_implementation(EXPORT_ATTENTION)
    # the exporter narrates on stdout (which must stay clean for `--json`) and warns about torchvision ops
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return _export(model, Path(folder), spec, progress)
    finally:
        model.set_attn_implementation(previous_attention)


def _export(model, folder: Path, spec: SpeedSpec, progress) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    shapes = kv_cache_shapes(model, spec.batch, spec.seqlen)
    prefill, decode, decode_reference = _graph_modules(model, len(shapes))
    g = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    prefill_args = (torch.randint(0, vocab, (spec.batch, spec.seqlen), generator=g),)
    past = []
    for k_shape, v_shape in shapes:  # keys transposed at the graph boundary (see _graph_modules)
        past += [torch.randn(k_shape, generator=g).transpose(2, 3).contiguous(), torch.randn(v_shape, generator=g)]
    decode_args = (torch.randint(0, vocab, (spec.batch, 1), generator=g), *past)
    kv_names = [f"{kind}_{i}" for i in range(len(shapes)) for kind in ("key_t", "value")]
    graphs = {  # graph: (module, example inputs, reference module, input names, output names)
        "prefill": (prefill, prefill_args, prefill, ["input_ids"], ["logits"] + [f"present_{n}" for n in kv_names]),
        "decode": (decode, decode_args, decode_reference, ["input_ids"] + [f"past_{n}" for n in kv_names],
                   ["logits"] + [f"new_{n}" for n in kv_names]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, (module, args, reference, inputs, outputs)) in enumerate(graphs.items()):
        path = folder / f"{name}.onnx"
        with torch.no_grad():
            expected = reference(*args)  # transformers' own rotate_half: the check below compares the two
            with rotate_half_as_matmul(model):
                program = torch.onnx.export(module, args, dynamo=True, opset_version=ONNX_OPSET,
                                            input_names=inputs, output_names=outputs, verbose=False)
        proto = program.model_proto
        proto.ir_version = DEEPSPARSE_IR_VERSION
        fold_weight_transposes(proto)
        reciprocals_as_divisions(proto)
        unit_transposes_as_reshapes(proto)
        onnx.save(proto, str(path))
        del program, proto
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {n: a.numpy() for n, a in zip(inputs, args)})
        for out_name, a, b in zip(outputs, got, expected):
            scale = float(b.abs().max()) or 1.0
            if a.shape != tuple(b.shape) or float(np.abs(a - b.numpy()).max()) > EXPORT_RTOL * scale:
                diff = float(np.abs(a - b.numpy()).max()) if a.shape == tuple(b.shape) else float("nan")
                raise RuntimeError(f"ONNX export of the {name} graph does not reproduce PyTorch's {out_name}: "
                                   f"max |difference| {diff:.3g} vs max |output| {scale:.3g} (shapes {a.shape}, "
                                   f"{tuple(b.shape)})")
        paths[name] = str(path)
        if progress is not None:
            progress(i + 1, len(graphs))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# DeepSparse environment


def deepsparse_env_dir() -> Path:
    return Path(os.environ.get("PRUNER_DEEPSPARSE_ENV") or PROJECT_ROOT / ".venv-deepsparse")


def _env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _find_base_python() -> str | None:
    """A CPython 3.8–3.11 to build the DeepSparse environment with (this one if it qualifies)."""
    lo, hi = DEEPSPARSE_PYTHONS
    if lo <= sys.version_info[:2] <= hi:
        return sys.executable
    for minor in range(hi[1], lo[1] - 1, -1):
        found = shutil.which(f"python3.{minor}")
        if found:
            return found
    return None


def platform_problem() -> str | None:
    """Why DeepSparse cannot run on this machine at all (None if it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"DeepSparse runs only on x86-64 CPUs; this machine is {platform.machine()}"
    if sys.platform != "linux":
        return f"DeepSparse runs only on Linux; this is {sys.platform}"
    from pruner.evaluate.speed_worker import cpu_info  # the worker's own CPU probe (it cannot import pruner)

    if "avx2" not in cpu_info()["flags"]:
        return "DeepSparse needs a CPU with AVX2; this CPU does not report it"
    if _find_base_python() is None:
        lo, hi = DEEPSPARSE_PYTHONS
        return (f"DeepSparse 1.8.0 needs CPython {lo[0]}.{lo[1]}–{hi[0]}.{hi[1]}; this is "
                f"{platform.python_version()} and no python3.{hi[1]}…3.{lo[1]} is on PATH")
    return None


def deepsparse_status() -> dict:
    """{"available": bool, "reason": why not (or None), "python": the environment's Python}."""
    problem = platform_problem()
    if problem:
        return {"available": False, "reason": problem, "python": None}
    python = _env_python(deepsparse_env_dir())
    if not python.exists():
        return {"available": False, "python": None,
                "reason": f"the DeepSparse environment {deepsparse_env_dir()} does not exist yet; build it with "
                          f"`make deepsparse` or `python -m pruner deepsparse-env`"}
    probe = subprocess.run([str(python), str(WORKER)], input=json.dumps({"probe": True}), capture_output=True,
                           text=True, env=_worker_env())
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"available": False, "python": str(python),
                "reason": f"DeepSparse does not import in {deepsparse_env_dir()}: {tail[0]}"}
    return {"available": True, "reason": None, "python": str(python), **_last_json(probe.stdout)}


def ensure_deepsparse_env(log: Callable[[str], None] = print) -> Path:
    """Create the DeepSparse virtual environment if missing (venv + pip, streamed to ``log``); returns its Python.

    Raises RuntimeError with the cause when the platform cannot run DeepSparse or pip fails; a failed install
    removes the half-built environment.
    """
    problem = platform_problem()
    if problem:
        raise RuntimeError(problem)
    env = deepsparse_env_dir()
    python = _env_python(env)
    if python.exists() and deepsparse_status()["available"]:
        log(f"DeepSparse environment ready: {env}")
        return python
    base = _find_base_python()
    log(f"creating {env} with {base}")
    shutil.rmtree(env, ignore_errors=True)
    steps = [[base, "-m", "venv", str(env)],
             [str(python), "-m", "pip", "install", "--disable-pip-version-check", *DEEPSPARSE_REQUIREMENTS]]
    try:
        for cmd in steps:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                if line.strip() and "is ignored: it is neither a file nor a directory" not in line:
                    log(line.rstrip())
            if proc.wait() != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
        status = deepsparse_status()
        if not status["available"]:
            raise RuntimeError(status["reason"])
    except BaseException:
        shutil.rmtree(env, ignore_errors=True)
        raise
    log(f"DeepSparse {status.get('deepsparse')} ready in {env}")
    return python


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["NM_DISABLE_ANALYTICS"] = "1"
    return env


def _last_json(stdout: str) -> dict:
    """The worker's answer: the last line of stdout that parses as JSON (DeepSparse prints a banner)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    raise RuntimeError(f"the speed worker printed no JSON answer; its output ended with: {stdout[-500:]!r}")


def run_worker(python: str, request: dict) -> dict:
    proc = subprocess.run([python, str(WORKER)], input=json.dumps(request), capture_output=True, text=True,
                          env=_worker_env())
    if proc.returncode != 0:
        steps = [line for line in proc.stderr.splitlines() if line.startswith("timing ")]
        where = f" while {steps[-1]}" if steps else ""
        if "Segmentation fault" in proc.stderr:  # DeepSparse prints its own crash report, then exits
            raise RuntimeError(f"DeepSparse crashed (segmentation fault){where}; it has crashed on very small "
                               f"shapes (seen with T = 8): try a larger --speed-seqlen")
        raise RuntimeError(f"the speed worker failed (exit {proc.returncode}){where}: {proc.stderr.strip()[-2000:]}")
    return _last_json(proc.stdout)


def matmul_weight_counts(model) -> tuple[int, int]:
    """(all, nonzero) weights of the matrix multiplies one decode step reads: every prunable linear layer inside
    the blocks plus the output projection (lm_head, read in full even when tied to the embedding)."""
    from pruner.models import find_blocks, prunable_layers, weight_matrix

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
        raise ValueError(f"engine must be auto, deepsparse or onnxruntime; got {engine!r}")
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


def cached_graphs(folder: Path | None) -> dict | None:
    """{graph: path} when ``folder`` holds both exported graphs, else None."""
    if folder is None or not all((Path(folder) / f"{g}.onnx").exists() for g in GRAPHS):
        return None
    return {g: str(Path(folder) / f"{g}.onnx") for g in GRAPHS}


def export_and_measure(dense_model, pruned_model, spec: SpeedSpec, *, dense_dir: Path | None = None,
                       engine: str = "auto", progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Export both models (the dense graphs are reused from ``dense_dir`` when present there; ``dense_model`` may
    then be None) and measure."""
    phase = (lambda name: (lambda d, t: progress(name, d, t))) if progress else (lambda name: None)
    # without DeepSparse the pruned graphs would only be timed on a dense runtime, which says nothing: skip them
    time_pruned = engine == "deepsparse" or (engine == "auto" and deepsparse_status()["available"])
    with tempfile.TemporaryDirectory(prefix="pruner-onnx-") as tmp:
        dense_graphs = cached_graphs(dense_dir)
        if dense_graphs is None:
            if dense_model is None:
                raise ValueError(f"no dense graphs cached in {dense_dir}: pass the dense model to export them")
            target = Path(dense_dir) if dense_dir is not None else Path(tmp) / "dense"
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            export_graphs(dense_model, partial, spec, phase("export dense"))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
            dense_graphs = cached_graphs(target)
        pruned_graphs = (export_graphs(pruned_model, Path(tmp) / "pruned", spec, phase("export pruned"))
                         if time_pruned else None)
        if progress:
            progress("timing", 0, 1)
        result = measure(dense_graphs, pruned_graphs, spec, pruned_model=pruned_model, engine=engine)
        if progress:
            progress("timing", 1, 1)
    return result
