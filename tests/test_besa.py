"""BESA-style learned allocation: the formulas on hand-made tensors, learning on tiny models and one real block,
and a BESA run through the pruning pipeline."""

import dataclasses

import numpy as np
import pytest
import torch

from pruner.allocation import BESA_DEFAULT_BETA, allocate
from pruner.data import calibration_tokens
from pruner.engine import artifacts
from pruner.engine.besa import (KEEP_FLOOR, BesaObserver, block_input_norms, candidate_sparsities, expected_keep,
                                expected_sparsity, learn_sparsities, prune_counts, rank_buckets, row_ranks,
                                shift_to_target)
from pruner.engine.calibrate import Cancelled, run_blockwise
from pruner.engine.stats import collect_stats
from pruner.model.catalogue import ModelSpec
from pruner.runs.execute import run_prune
from pruner.specs import CalibSpec, PruneSpec
from pruner.store.files import read_manifest
from tests.tiny_models import tiny_model, tiny_tokens


def test_candidates_and_counts():
    assert candidate_sparsities(0.25).tolist() == [0.0, 0.25, 0.5, 0.75]
    assert len(candidate_sparsities()) == 100
    assert prune_counts(4, candidate_sparsities(0.25)).tolist() == [0, 1, 2, 3]
    assert prune_counts(10, candidate_sparsities(0.25)).tolist() == [0, 2, 5, 8]  # round(2.5) = 2, round(7.5) = 8
    with pytest.raises(ValueError, match="must divide 1"):
        candidate_sparsities(0.3)


def test_ranks_buckets_and_expected_mask_by_hand():
    scores = torch.tensor([[0.3, 0.1, 0.2, 0.1]])
    ranks = row_ranks(scores)
    assert ranks.tolist() == [[3, 0, 2, 1]]  # the tie 0.1/0.1 is broken by position, as the methods' stable sort
    counts = prune_counts(4, candidate_sparsities(0.25))  # prune 0, 1, 2, 3 of the row
    buckets = rank_buckets(ranks, counts)
    assert buckets.tolist() == [[3, 0, 2, 1]]  # rank r is kept by candidates 0…r
    assert rank_buckets(ranks, prune_counts(4, candidate_sparsities(0.5))).tolist() == [[1, 0, 1, 0]]
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    keep = expected_keep(logits, buckets)
    # P(keep rank r) = p_0 + … + p_r: cumsum [0.1, 0.3, 0.6, 1.0] read at ranks 3, 0, 2, 1
    torch.testing.assert_close(keep, torch.tensor([[1.0, 0.1, 0.6, 0.3]]))
    s = expected_sparsity(logits, counts, 4)  # Σ p_k c_k / n = (0.2 + 0.6 + 1.2) / 4
    assert float(s) == pytest.approx(0.5)
    assert float(1 - keep.mean()) == pytest.approx(float(s))  # the expected mask and ŝ agree


def test_expected_keep_floors_negligible_probabilities_to_exact_zero():
    logits = torch.tensor([-200.0, 0.0])  # p_0 ≈ 1e-87: float32 gives a subnormal or zero
    keep = expected_keep(logits, torch.tensor([[0, 1]]))
    assert keep.tolist() == [[0.0, 1.0]]
    assert KEEP_FLOOR > torch.finfo(torch.float32).tiny


def test_shift_to_target_by_hand():
    shifted, delta = shift_to_target(np.array([0.6, 0.8]), np.array([1, 3]), 0.7)  # mean 0.75 → δ = −0.05
    np.testing.assert_allclose(shifted, [0.55, 0.75])
    assert delta == pytest.approx(-0.05)
    with pytest.raises(ValueError, match=r"inside \[0, 1\).*raise β"):
        shift_to_target(np.array([0.02, 0.98]), np.array([1, 1]), 0.52)  # δ = 0.02 puts a layer at 1.0


def _learn_first_blocks(model, tokens, target, blocks=1, **kw):
    observer = BesaObserver(target, block_input_norms(collect_stats(model, tokens, "cpu")), **kw)
    try:
        run_blockwise(model, tokens, observer, progress=None, should_cancel=lambda: len(observer.results) >= blocks)
    except Cancelled:
        pass
    return observer.results


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D stores weights transposed
def test_learning_lowers_the_error_and_meets_the_target_exactly(family):
    model = tiny_model(family)
    flags = [p.requires_grad for p in model.parameters()]
    tokens = tiny_tokens(8, 16)
    results, _ = learn_sparsities(model, tokens, 0.6, collect_stats(model, tokens, "cpu"), epochs=4, batch_size=4)
    assert len(results) == 3
    for r in results:
        assert r.error_last < r.error_first
        assert float((r.sparsity * r.numel).sum() / r.numel.sum()) == pytest.approx(0.6, abs=1e-12)
        np.testing.assert_allclose(r.sparsity - r.learned, r.shift)
        assert r.steps == 4 * 2
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_bad_settings_are_rejected():
    model, tokens = tiny_model("llama"), tiny_tokens(4, 8)
    stats = collect_stats(model, tokens, "cpu")
    with pytest.raises(ValueError, match=r"β \(beta\) must be a number > 0; got 0"):
        learn_sparsities(model, tokens, 0.5, stats, beta=0)
    with pytest.raises(ValueError, match="epochs must be an integer ≥ 1"):
        learn_sparsities(model, tokens, 0.5, stats, epochs=0)
    with pytest.raises(ValueError, match=r"S must be in \(0, 1\)"):
        learn_sparsities(model, tokens, 1.0, stats)
    with pytest.raises(ValueError, match="the statistics' layers"):
        learn_sparsities(tiny_model("gpt2"), tokens, 0.5, stats)  # another architecture's statistics
    with pytest.raises(ValueError, match="learned from calibration data"):
        allocate("besa", None, 0.5)
    with pytest.raises(ValueError, match=r"β \(beta\) must be a number > 0; got -1"):
        PruneSpec(allocator="besa", allocator_params={"beta": -1})


def test_on_a_real_block_the_learned_allocation_beats_uniform(smollm2, data_dir):
    """SmolLM2's first block at S = 0.7: with hard Wanda masks, the learned per-layer sparsities reconstruct the
    block better than the same sparsity everywhere (0.149 vs 0.201 on 32 × 512 tokens)."""
    tokens = calibration_tokens(smollm2.tokenizer, CalibSpec(nsamples=8, seqlen=128, data_dir=data_dir))
    (r,) = _learn_first_blocks(smollm2.model, tokens, 0.7, epochs=2)
    assert r.error_hard < r.error_uniform
    assert r.sparsity.min() < 0.7 < r.sparsity.max()  # it did move layers apart


def test_besa_run_through_the_pipeline_is_exact_and_cached(tiny_folder, data_dir, tmp_path):
    spec = PruneSpec(model=ModelSpec(tiny_folder, device="cpu"), calib=CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir),
                     allocator="besa", method="wanda", sparsity=0.6)
    assert spec.allocator_params == {"beta": BESA_DEFAULT_BETA} and BESA_DEFAULT_BETA == 50.0
    phases = []
    folder = run_prune(spec, tmp_path, progress=lambda ph, d, t: phases.append(ph))
    assert "learn allocation" in phases and phases[-1] == "prune"
    manifest = read_manifest(folder)
    learned = artifacts.cached_learned(spec.stats_spec, "besa", 0.6, {"beta": 50.0}, tmp_path)
    assert learned is not None and learned["steps_per_block"] == 4  # 4 epochs × one mini-batch of 4 samples
    allocated = [l["allocated"] for l in manifest["achieved"]["layers"]]
    np.testing.assert_allclose(allocated, learned["layer_sparsity"])
    assert manifest["allocation"]["params"] == {"beta": 50.0}
    assert manifest["achieved"]["overall"] == pytest.approx(0.6, abs=0.5 / 32)  # rounding: half a weight per row
    for layer in manifest["achieved"]["layers"]:
        in_features = 48 if layer["name"] == "mlp.down_proj" else 32  # the tiny Llama: hidden 32, MLP 48
        assert abs(layer["achieved"] - layer["allocated"]) <= 0.5 / in_features + 1e-9
    assert "learn_allocation" in manifest["timings_s"]
    # a second run with the same S reuses the learned allocation (no new learning phase)
    phases.clear()
    run_prune(dataclasses.replace(spec, method="magnitude", method_params={}), tmp_path,
                  progress=lambda ph, d, t: phases.append(ph))
    assert "learn allocation" not in phases


def test_besa_collects_missing_statistics_in_its_own_pass(tiny_folder, data_dir, tmp_path, monkeypatch):
    """No separate statistics pass for BESA: the learning pass collects them, and both the statistics and the
    learned sparsities are exactly those of the two-pass route."""
    from pruner.engine.stats import Stats

    spec = PruneSpec(model=ModelSpec(tiny_folder, device="cpu"), calib=CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir),
                     allocator="besa", method="wanda", sparsity=0.6)
    # the two-pass route: statistics first, then learning from them
    artifacts.get_stats(spec.stats_spec, tmp_path / "two")
    two = artifacts.learn_allocation(spec.stats_spec, "besa", 0.6, {"beta": 50.0}, tmp_path / "two")
    # the fused route: computing statistics separately is refused
    monkeypatch.setattr(artifacts, "compute_stats", lambda *a, **k: pytest.fail("a separate statistics pass ran"))
    folder = run_prune(spec, tmp_path / "one")
    assert read_manifest(folder)["allocation_inputs"] == "statistics collected in the learning pass"
    one = artifacts.cached_learned(spec.stats_spec, "besa", 0.6, {"beta": 50.0}, tmp_path / "one")
    assert one["layer_sparsity"] == two["layer_sparsity"]
    a = artifacts.load_cached_stats(spec.stats_spec, tmp_path / "one")
    b = artifacts.load_cached_stats(spec.stats_spec, tmp_path / "two")
    assert isinstance(a, Stats) and a.layer_names == b.layer_names
    for field in ("block_mean_score", "ratio_counts_above", "score_hist", "layer_alpha"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert all(np.array_equal(x, y) for x, y in zip(a.input_norms, b.input_norms))
