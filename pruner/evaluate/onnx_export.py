"""ONNX export of a causal LM for CPU timing: two static-shape graphs written with the torch dynamo exporter
(opset 18, IR version lowered to 8 for DeepSparse 1.8): **prefill** (B × T token ids → last-position logits and the
KV cache) and **decode** (B × 1 token ids plus an explicit KV cache of T positions per layer → logits and the new
position's key and value). At the graph boundary keys are stored transposed, (B, H_kv, d, T), values as
(B, H_kv, T, d), so the decode step reads the cache in place and never copies it. The graph rewrites DeepSparse
needs (folded weight transposes, reciprocals as divisions, ...) live here too.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from pathlib import Path
from typing import Callable

import torch

from pruner.evaluate.speed_spec import SpeedSpec

#: DeepSparse 1.8.0's bundled ONNX reader accepts IR version 8; the exporter writes 10 (opset 18 is fine).
DEEPSPARSE_IR_VERSION = 8
ONNX_OPSET = 18
#: The two exported graphs of every model (see ``export_graphs``).
GRAPHS = ("prefill", "decode")
#: The exported graphs must reproduce PyTorch within this fraction of its largest |output| (float32 kernels of two
#: runtimes through 30 layers differ by ~1e-4 of the largest logit on SmolLM2 with a random KV cache).
EXPORT_RTOL = 1e-3


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


def export_score_graph(model, path: Path, seqlen: int) -> str:
    """Write one graph that scores a window: (1, ``seqlen``) token ids → logits at every position (1, T, vocab), no
    KV cache; the full-logits graph an 8-bit perplexity runs on (``pruner.evaluate.openvino_speed``). Exported and
    checked against PyTorch as ``export_graphs`` does (EXPORT_RTOL); the model is left as it was."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    class Score(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = model

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    model = model.eval()
    previous_attention = model.config._attn_implementation
    _register_export_attention()
    model.set_attn_implementation(EXPORT_ATTENTION)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, seqlen), generator=torch.Generator().manual_seed(0))
    module = Score().eval()
    try:
        with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
            expected = module(ids).numpy()
            with rotate_half_as_matmul(model):
                program = torch.onnx.export(module, (ids,), dynamo=True, opset_version=ONNX_OPSET,
                                            input_names=["input_ids"], output_names=["logits"], verbose=False)
    finally:
        model.set_attn_implementation(previous_attention)
    proto = program.model_proto
    fold_weight_transposes(proto)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    del program, proto
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})[0]
    scale = float(np.abs(expected).max()) or 1.0
    if got.shape != expected.shape or float(np.abs(got - expected).max()) > EXPORT_RTOL * scale:
        raise RuntimeError(f"ONNX export of the score graph does not reproduce PyTorch's logits (shapes {got.shape}, "
                           f"{expected.shape})")
    return str(path)


def cached_graphs(folder: Path | None) -> dict | None:
    """{graph: path} when ``folder`` holds both exported graphs, else None."""
    if folder is None or not all((Path(folder) / f"{g}.onnx").exists() for g in GRAPHS):
        return None
    return {g: str(Path(folder) / f"{g}.onnx") for g in GRAPHS}
