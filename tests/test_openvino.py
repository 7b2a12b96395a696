"""OpenVINO's 8-bit sparse path: a tiny pruned model exported, quantized w8a8 and compiled; its outputs against
PyTorch's; the pruned zeros kept in the int8 weights; the packed (sparse-decompressed) layers where the CPU has AMX;
and the command's one line where it has not."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pruner.evaluate import openvino_speed as ovs
from pruner.evaluate.onnx_export import export_graphs
from pruner.evaluate.speed_spec import SpeedSpec
from pruner.store.files import read_manifest
from tests.tiny_models import VOCAB, tiny_model

#: The 8-bit (w8a8) logits of the tiny model on its calibration text are within this fraction of PyTorch's largest
#: |logit| (measured: 0.20 on prefill; int8 activations of a random 32-wide model are coarse), and give the same
#: next token. The float OpenVINO graph is held to ``ovs.FLOAT_RTOL`` (1e-3).
INT8_RTOL = 0.3
HAS_AMX = ovs.amx_status()["available"]


def _pruned_tiny(fraction: float = 0.5):
    """The tiny Llama with the smallest-|w| ``fraction`` of every block weight row zeroed (exactly, per row)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                k = round(fraction * p.shape[1])
                p.scatter_(1, p.abs().argsort(dim=1)[:, :k], 0.0)
    return model


def test_sparse_rate_is_the_least_sparse_pruned_layer_rounded_down():
    assert ovs.sparse_rate([0.0, 0.734, 0.5012, 0.9]) == pytest.approx(0.50)
    assert ovs.sparse_rate([0.7, 0.7]) == pytest.approx(0.70)  # exactly on the grid stays there
    with pytest.raises(ValueError, match="no pruned layer"):
        ovs.sparse_rate([0.0, 0.0])


def test_w8a8_export_matches_pytorch_keeps_the_zeros_and_packs_where_amx(tmp_path):
    model = _pruned_tiny(0.5)
    spec = SpeedSpec(batch=1, seqlen=16)
    graphs = export_graphs(model, tmp_path, spec)
    windows = np.random.default_rng(0).integers(0, VOCAB, size=(8, spec.seqlen + 1))
    feeds = ovs.calibration_feeds(graphs, windows)
    # the decode graph is calibrated on the KV cache of real prefills: equal to PyTorch's own cache
    with torch.no_grad():
        cache = model(torch.from_numpy(windows[:1, :16]), use_cache=True).past_key_values
    np.testing.assert_allclose(feeds["decode"][0]["past_value_0"], cache.layers[0].values.numpy(), atol=1e-5)
    rate = ovs.sparse_rate(ovs.layer_sparsities(model))
    assert rate == pytest.approx(0.5)
    ids = torch.from_numpy(windows[:1, :16])
    with torch.no_grad():
        expected = model(ids).logits[:, -1].numpy()
    float_out = np.asarray(ovs.compile_model(graphs["prefill"], 1, None)({"input_ids": ids.numpy()})[0])[:, 0]
    assert np.abs(float_out - expected).max() <= ovs.FLOAT_RTOL * np.abs(expected).max()
    ir = ovs.quantize_w8a8(graphs["prefill"], feeds["prefill"], tmp_path / "prefill_int8.xml")
    zeros = ovs.int8_weight_zeros(ir)
    # 7 linears × 3 blocks at exactly 50% zeros; the other int8 matrices: rotate_half's signed permutation (7 of
    # 8 entries zero) and the unpruned embedding/output projection (a few weights round to 0)
    others = [z for z in zeros if z != 0.5]
    assert zeros.count(0.5) == 21 and 0.875 in others and max(z for z in others if z != 0.875) < 0.05, zeros
    compiled = ovs.compile_model(ir, 1, rate)
    got = np.asarray(compiled({"input_ids": ids.numpy()})[0])[:, 0]
    assert np.abs(got - expected).max() <= INT8_RTOL * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    packed = ovs.packed_layers(compiled)
    # every matmul runs on int8 weights and activations: 21 block linears, the output projection and rotate_half's
    # matmul on the queries and keys of each block (6)
    assert packed["fully_connected"] == packed["int8"] == 28
    if not HAS_AMX:
        # the packed kernels are AMX ones: here no layer is packed, which is why the command times nothing
        assert packed["sparse"] == 0
        return
    # with AMX every pruned block layer is packed (rotate_half's 87.5%-zero matrix may be too; the output
    # projection is not: below the rate)
    assert 21 <= packed["sparse"] <= 27, packed["primitives"]
    dense_ir = ovs.quantize_w8a8(graphs["prefill"], feeds["prefill"], tmp_path / "dense.xml")
    assert ovs.packed_layers(ovs.compile_model(dense_ir, 1, None))["sparse"] == 0  # without the property: none


def test_eval_speed_openvino_on_a_stored_run(own_tiny_run, data_dir):
    """The command end to end: without AMX one line about speed and no speed-up in the manifest; with AMX timings
    whose speed-up is attributable (packed layers); anywhere, the 8-bit models' perplexity beside the float one."""
    cache, folder = own_tiny_run
    env = {**os.environ, "PRUNER_CACHE_DIR": str(cache), "PRUNER_DATA_DIR": data_dir}
    proc = subprocess.run([sys.executable, "-m", "pruner", "eval", "--run", folder.name, "--speed", "--engine",
                           "openvino", "--speed-seqlen", "16", "--threads", "1", "--ppl", "--max-chunks", "1",
                           "--eval-seqlen", "32"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stored = {k: v for k, v in read_manifest(folder)["metrics"].items() if k.startswith("speed:openvino")}
    assert list(stored) == ["speed:openvino:b1:t16:threads1"]
    result = stored["speed:openvino:b1:t16:threads1"]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    # the 8-bit step's perplexity beside the float one, both models, one protocol (first chunk of 32 tokens)
    for model in ("dense", "pruned"):
        row = result["perplexity"][model]
        assert row["int8"]["chunks"] == row["float"]["chunks"] == 1 and row["int8"]["seqlen"] == 32
        assert row["int8"]["perplexity"] > 1 and len(row["int8"]["chunk_mean_nll"]) == 1
        assert any(line.strip().startswith(f"{model} perplexity: float") and "8-bit" in line for line in lines)
    speed_lines = [line for line in lines if "OpenVINO" in line or "speed-up" in line or "packed" in line]
    if not HAS_AMX:
        assert len(speed_lines) == 1 and "has no AMX" in speed_lines[0] and "no speed-up measured" in speed_lines[0]
        assert result["amx"] is False and result["speedup"] == {"prefill": None, "decode": None}
        assert result["graphs"] == {}
        return
    assert result["amx"] is True and not result["rejected"]
    for graph in ("prefill", "decode"):
        assert result["packed"]["pruned"][graph]["sparse"] > 0
        assert result["speedup"][graph] > 0 and len(result["speedup_by_round"][graph]) == result["spec"]["rounds"]
    assert json.dumps(result)  # the manifest holds plain data
