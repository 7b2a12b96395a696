"""The bundled real model, end to end with small settings."""

import numpy as np
import pytest

from pruner.allocation import ALLOCATORS, allocate, formula_allocators
from pruner.data import calibration_tokens
from pruner.engine import artifacts
from pruner.model.catalogue import ModelSpec
from pruner.model.loading import model_summary
from pruner.runs import metrics
from pruner.runs.execute import run_prune
from pruner.specs import CalibSpec, StatsSpec
from pruner.store.layout import CacheLayout
from tests.conftest import share_project_models
from tests.test_calibrate import direct_input_norms


@pytest.fixture(scope="module")
def small_stats(smollm2, data_dir, tmp_path_factory):
    cache = share_project_models(tmp_path_factory.mktemp("cache"))  # (a bare cache would convert SmolLM2 again)
    spec = StatsSpec(ModelSpec("smollm2-135m", device="cpu"), CalibSpec(nsamples=4, seqlen=128, data_dir=data_dir))
    seen = []
    stats = artifacts.get_stats(spec, cache, loaded=smollm2, progress=lambda d, t: seen.append((d, t)))
    return spec, cache, stats, seen


def test_summary(smollm2):
    s = model_summary(smollm2)
    assert s["architecture"] == "LlamaForCausalLM" and s["blocks"] == 30
    assert s["prunable_layers_per_block"] == 7
    assert s["prunable_parameters"] == 30 * (4 * 576 * 576 // 3 * 2 + 3 * 576 * 1536)  # q,o 576²; k,v 576×192
    assert s["weights"] == "Q4_1-dequantized"


def test_stats_cached_and_progress(small_stats):
    spec, cache, stats, seen = small_stats
    assert seen[0] == (0, 30) and seen[-1] == (30, 30) and len(seen) == 31  # 0: the first block starts
    assert (CacheLayout.at(cache).stats(spec.key()) / "stats.npz").exists()
    again = artifacts.load_cached_stats(spec, cache)
    np.testing.assert_array_equal(again.ratio_counts_above, stats.ratio_counts_above)
    assert again.meta["summary"]["blocks"] == 30


def test_stats_match_full_forward_on_real_model(smollm2, small_stats):
    spec, _, stats, _ = small_stats
    tokens = calibration_tokens(smollm2.tokenizer, spec.calib)
    direct = direct_input_norms(smollm2.model, tokens)
    for l in (0, 6, 7 * 15 + 4, 7 * 29 + 6):  # q_proj and down_proj of block 0, gate of 15, down of 29
        key = (int(stats.layer_block[l]), stats.layer_names[l])
        np.testing.assert_allclose(stats.input_norms[l], direct[key].numpy(), rtol=1e-3, atol=1e-4)


def test_lod_shape_and_monotone(small_stats):
    _, _, stats, _ = small_stats
    lods = np.stack([stats.lod(m) for m in (3, 5, 7)])
    assert lods.shape == (3, 30)
    assert np.all(lods[0] >= lods[1]) and np.all(lods[1] >= lods[2])
    assert 0 < lods[1].mean() < 0.1  # a few percent of scores exceed 5 × the block mean


@pytest.mark.parametrize("name", formula_allocators())
@pytest.mark.parametrize("S", [0.5, 0.7])
def test_allocators_hit_target_on_real_stats(small_stats, name, S):
    _, _, stats, _ = small_stats
    a = allocate(name, stats, S, **ALLOCATORS[name].pick({"lam": 0.08, "m": 5}))
    weights = stats.layer_numel
    assert float((a.layer_sparsity * weights).sum() / weights.sum()) == pytest.approx(S, abs=1e-6)
    assert np.all(a.layer_sparsity >= 0) and np.all(a.layer_sparsity < 1)


def test_prune_and_perplexity_end_to_end(smollm2, data_dir, small_stats):
    from pruner.specs import PruneSpec
    from pruner.store.files import read_manifest

    stats_spec, cache, _, _ = small_stats  # the allocation reads these cached statistics (no second stats pass)
    spec = PruneSpec(model=stats_spec.model, calib=stats_spec.calib, allocator="owl", method="wanda", sparsity=0.5)
    folder = run_prune(spec, cache, loaded=smollm2)
    manifest = read_manifest(folder)
    for layer in manifest["achieved"]["layers"]:  # within one weight per output row (the Q4_1 weights hold a few
        in_features = 1536 if layer["name"] == "mlp.down_proj" else 576  # exact zeros, which only add)
        assert layer["pruned"] == layer["numel"] // in_features * round(layer["allocated"] * in_features)
        assert -1 / in_features <= layer["achieved"] - layer["allocated"] <= 0.002
    dense = metrics.dense_perplexity(spec.model, data_dir, cache, loaded=smollm2, max_chunks=1, seqlen=256)
    pruned = metrics.evaluate_perplexity(folder, data_dir, max_chunks=1, seqlen=256)
    assert 5 < dense["perplexity"] < pruned["perplexity"] < 20 * dense["perplexity"]
    assert pruned["partial"] and pruned["chunks"] == 1
