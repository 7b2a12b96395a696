"""ONNX export (same logits as PyTorch, prefill + decode with an explicit KV cache), the decode-speed estimate on
hand-counted weights, the dense-runtime fallback, and the DeepSparse worker round trip."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from pruner.evaluate import deepsparse_env, onnx_export, speed, speed_spec
from pruner.store.formats import EXPORT_VERSION
from pruner.evaluate.onnx_export import export_graphs, fold_weight_transposes
from pruner.evaluate.speed import ideal_decode_speedup
from pruner.evaluate.speed_spec import SpeedSpec
from pruner.runs import metrics
from pruner.store.files import read_manifest
from tests.tiny_models import VOCAB, tiny_model


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), feeds)})


def test_export_reproduces_pytorch_prefill_and_decode(tmp_path):
    model = tiny_model("llama")
    before = model.config._attn_implementation
    spec = SpeedSpec(batch=2, seqlen=8)
    paths = export_graphs(model, tmp_path, spec)
    assert model.config._attn_implementation == before  # the caller's model is left as it was
    decode_graph = onnx.load(paths["decode"])
    assert decode_graph.ir_version == onnx_export.DEEPSPARSE_IR_VERSION
    ops = {n.op_type for n in decode_graph.graph.node}
    assert "Reciprocal" not in ops and "Div" in ops  # RMSNorm's rsqrt, in the form DeepSparse runs itself
    assert "Transpose" not in ops  # with one new position, every transpose only moves length-1 axes: reshapes
    assert "Neg" not in ops  # rotate_half is a MatMul with a signed permutation (rotate_half_as_matmul)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
    prefill = _run(paths["prefill"], [ids[:, :8].numpy()])
    assert prefill[0].shape == (2, 1, VOCAB)  # last position only
    np.testing.assert_allclose(prefill[0][:, 0], full[:, 7].numpy(), atol=1e-5)
    # decode step on the prefill's KV cache = the full forward's next position
    decode = _run(paths["decode"], [ids[:, 8:].numpy(), *prefill[1:]])
    np.testing.assert_allclose(decode[0][:, 0], full[:, 8].numpy(), atol=1e-5)
    assert decode[1].shape[3] == 1  # only the new position's key (the caller appends it to its cache)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    # keys cross the graph boundary transposed, (B, H_kv, d, T); values as transformers keeps them, (B, H_kv, T, d)
    np.testing.assert_allclose(prefill[1], cache.layers[0].keys[:, :, :8].transpose(2, 3).numpy(), atol=1e-5)
    np.testing.assert_allclose(decode[1], cache.layers[0].keys[:, :, 8:].transpose(2, 3).numpy(), atol=1e-5)
    np.testing.assert_allclose(decode[2], cache.layers[0].values[:, :, 8:].numpy(), atol=1e-5)
    # the decode step never copies the cache: every past tensor is read only by a MatMul (no Concat, no Transpose)
    past = {i.name for i in decode_graph.graph.input if i.name.startswith("past_")}
    readers = {n.op_type for n in decode_graph.graph.node for i in n.input if i in past}
    assert len(past) == 2 * len(model.model.layers) and readers == {"MatMul"}


def test_fold_weight_transposes_on_a_hand_made_graph(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(w, "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert fold_weight_transposes(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["MatMul"]
    assert [i.name for i in proto.graph.initializer] == ["Wt"]  # the untransposed copy is no longer used
    onnx.save(proto, tmp_path / "g.onnx")
    x = np.array([[1, 2, 3]], dtype=np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "g.onnx", [x])[0], x @ w.T)  # [[8, 26]]


def test_reciprocals_become_divisions_on_a_hand_made_graph(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["r"]), helper.make_node("Reciprocal", ["r"], ["inv"]),
         helper.make_node("Mul", ["x", "inv"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert onnx_export.reciprocals_as_divisions(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["Sqrt", "Div", "Mul"]  # order kept
    onnx.save(proto, tmp_path / "g.onnx")
    x = np.array([[1, 4, 9]], dtype=np.float32)
    np.testing.assert_allclose(_run(tmp_path / "g.onnx", [x])[0], [[1, 2, 3]])  # x / √x


def _worker_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed_worker", deepsparse_env.WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timing_takes_turns_in_rounds():
    calls = []
    timings = _worker_module().time_interleaved({"dense": lambda: calls.append("d"), "pruned": lambda: calls.append("p")},
                                               warmup=2, runs=7, rounds=3)
    # 2 warm-up calls each, then 3 rounds of ⌈7 / 3⌉ = 3 timed calls, dense and pruned in turn, each turn
    # after one untimed call
    assert "".join(calls) == "dd" + "pp" + "d" + "ddd" + "p" + "ppp" + ("d" + "ddd" + "p" + "ppp") * 2
    for name in ("dense", "pruned"):
        t = timings[name]
        assert t["runs"] == 9 and t["rounds"] == 3 and len(t["round_medians_ms"]) == 3 and t["warmup"] == 2
        assert 0 <= t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]


def test_rotate_half_as_matmul_is_exact_and_restored():
    from transformers.models.llama import modeling_llama

    model = tiny_model("llama")
    original = modeling_llama.rotate_half
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-5.0, 6.5, 7.0, -8.0]])
    with onnx_export.rotate_half_as_matmul(model):
        assert modeling_llama.rotate_half is not original
        got = modeling_llama.rotate_half(x)
    assert modeling_llama.rotate_half is original
    assert torch.equal(got, torch.tensor([[-3.0, -4.0, 1.0, 2.0], [-7.0, 8.0, -5.0, 6.5]]))  # cat(-x₂, x₁)
    assert torch.equal(got, original(x))


def test_unit_transposes_become_reshapes_on_a_hand_made_graph(tmp_path):
    # (1, 1, 2, 3) → (1, 2, 1, 3) moves only a length-1 axis; (1, 2, 2, 3) → (1, 2, 2, 3) with axes 1, 2 swapped
    # moves data and must stay a Transpose
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["a"], ["ta"], perm=[0, 2, 1, 3]),
         helper.make_node("Transpose", ["b"], ["tb"], perm=[0, 2, 1, 3])],
        "g", [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, 1, 2, 3]),
              helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1, 2, 2, 3])],
        [helper.make_tensor_value_info("ta", onnx.TensorProto.FLOAT, [1, 2, 1, 3]),
         helper.make_tensor_value_info("tb", onnx.TensorProto.FLOAT, [1, 2, 2, 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert onnx_export.unit_transposes_as_reshapes(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["Reshape", "Transpose"]
    onnx.save(proto, tmp_path / "g.onnx")
    a = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    b = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3)
    ta, tb = _run(tmp_path / "g.onnx", [a, b])
    np.testing.assert_array_equal(ta, a.transpose(0, 2, 1, 3))  # [[[[0, 1, 2]], [[3, 4, 5]]]]
    np.testing.assert_array_equal(tb, b.transpose(0, 2, 1, 3))


def test_ideal_decode_speedup_counts_block_linears_and_the_head():
    model = tiny_model("llama")  # hidden 32, intermediate 48, 4 heads of 8, 2 KV heads, 3 blocks, vocab 96
    per_block = 32 * 32 + 2 * (16 * 32) + 32 * 32 + 3 * (48 * 32)  # q, k, v, o, gate, up, down
    total = 3 * per_block + 96 * 32
    zeroed = 0
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.up_proj.weight[:, :16] = 0  # 48 × 16 per block
            zeroed += 48 * 16
    assert speed.matmul_weight_counts(model) == (total, total - zeroed)
    assert ideal_decode_speedup(model) == pytest.approx(total / (total - zeroed))


@pytest.mark.parametrize("kwargs, message", [
    ({"runs": 5}, "runs must be ≥ 30"), ({"batch": 0}, "batch must be ≥ 1"), ({"seqlen": 0}, "seqlen"),
    ({"threads": 10_000}, "threads must be between 1 and"), ({"rounds": 0}, r"rounds must be between 1 and runs \(30\)"),
    ({"runs": 30, "rounds": 31}, "rounds must be between 1 and runs"),
])
def test_speed_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeedSpec(**kwargs)


def test_dense_runtime_fallback_reports_an_estimate_not_a_speedup(tmp_path):
    dense, pruned = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        for block in pruned.model.layers:
            block.mlp.down_proj.weight.zero_()
    result = speed.export_and_measure(dense, pruned, SpeedSpec(seqlen=8), engine="onnxruntime")
    assert result["engine"] == "onnxruntime" and not result["deepsparse_available"]
    assert "ONNX Runtime was asked for" in result["deepsparse_reason"]
    for graph in ("prefill", "decode"):
        row = result["graphs"][graph]
        assert row["dense"]["runs"] == 30 and row["dense"]["median_ms"] > 0 and "pruned" not in row
        assert result["speedup"][graph] is None
    estimate = result["ideal_decode_speedup_estimate"]
    assert estimate == pytest.approx(ideal_decode_speedup(pruned)) and estimate > 1


def test_cached_dense_graphs_need_no_dense_model(tmp_path):
    dense, pruned = tiny_model("llama"), tiny_model("llama")
    spec = SpeedSpec(seqlen=8)
    with pytest.raises(ValueError, match="no dense graphs cached in .*: pass the dense model"):
        speed.export_and_measure(None, pruned, spec, dense_dir=tmp_path / "dense", engine="onnxruntime")
    assert onnx_export.cached_graphs(tmp_path / "dense") is None and not (tmp_path / "dense").exists()
    first = speed.export_and_measure(dense, pruned, spec, dense_dir=tmp_path / "dense", engine="onnxruntime")
    assert onnx_export.cached_graphs(tmp_path / "dense") == {g: str(tmp_path / "dense" / f"{g}.onnx") for g in onnx_export.GRAPHS}
    phases = []
    again = speed.export_and_measure(None, pruned, spec, dense_dir=tmp_path / "dense", engine="onnxruntime",
                                     progress=lambda p, d, t: phases.append(p))
    assert "export dense" not in phases and again["graphs"]["decode"]["dense"]["runs"] == 30
    assert again["raw"]["dense"]["decode"]["inputs"] == first["raw"]["dense"]["decode"]["inputs"]


def _deepsparse_or_skip():
    status = deepsparse_env.deepsparse_status()
    if not status["available"]:
        if os.environ.get("CI") == "true" and deepsparse_env.platform_problem() is None:
            pytest.fail(f"CI must run the DeepSparse test (`make test` builds the environment): {status['reason']}")
        pytest.skip(status["reason"])


def test_deepsparse_worker_round_trip_on_a_stored_run(speed_timed_run):
    """The tiny run's speed as measured once per test run (engine "auto", which is DeepSparse wherever it runs:
    the Compare page's tests read the same measurement)."""
    _deepsparse_or_skip()
    cache, folder, phases = speed_timed_run
    (name, result), = [(k, v) for k, v in read_manifest(folder)["metrics"].items() if k.startswith("speed:")]
    assert name == metrics.speed_metric_name(result)
    assert {"export pruned", "timing"} <= set(phases)  # the dense graphs may have been cached before
    assert result["engine"] == "deepsparse" and result["env"]["deepsparse"] == "1.8.0" and result["rejected"] == []
    for graph in ("prefill", "decode"):
        row = result["graphs"][graph]
        for model in ("dense", "pruned"):
            assert row["checks"][model]["ok"] and row["checks"][model]["max_rel_diff"] <= speed.OUTPUT_RTOL
            assert row[model]["runs"] == 30 and row[model]["compile_s"] > 0
            assert len(row[model]["round_medians_ms"]) == speed_spec.DEFAULT_ROUNDS  # 5 rounds of 6 calls, in turn
        assert result["speedup"][graph] == pytest.approx(row["dense"]["median_ms"] / row["pruned"]["median_ms"])
        assert result["speedup_by_round"][graph] == pytest.approx(
            [d / p for d, p in zip(row["dense"]["round_medians_ms"], row["pruned"]["round_medians_ms"])])
    assert result["sparsity"] == pytest.approx(0.5, abs=0.01)
    # the dense graphs are kept for the next run of the same model and shape
    assert sorted(p.name for p in next((cache / "dense").iterdir()).glob(f"onnx/v{EXPORT_VERSION}-b1-t16/*.onnx")) == [
        "decode.onnx", "prefill.onnx"]
