"""Allocators on hand-made inputs with outputs worked out by hand."""

import numpy as np
import pytest

from pruner.allocation import (ALLOCATORS, AllocationRefused, allocate, atp, atp_delta_max, dlp, dlp_importance, er,
                               formula_allocators, global_threshold, owl, owl_inverse, owl_lambda_max, uniform)


def test_uniform():
    np.testing.assert_array_equal(uniform(3, 0.7), [0.7, 0.7, 0.7])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        uniform(3, 1.0)
    with pytest.raises(ValueError, match="n_blocks"):
        uniform(0, 0.5)


def test_owl_official_formula_worked_by_hand():
    # r = [2, 10, 4, 4, 0], S = 0.7, λ = 0.08
    # r̃ = (r − 0) / (10 − 0) · 0.16 = [0.032, 0.16, 0.064, 0.064, 0];  mean r̃ = 0.32 / 5 = 0.064
    # density = r̃ − 0.064 + 0.3 = [0.268, 0.396, 0.300, 0.300, 0.236];  sparsity = 1 − density
    out = owl([2, 10, 4, 4, 0], 0.7, 0.08)
    np.testing.assert_allclose(out, [0.732, 0.604, 0.700, 0.700, 0.764], atol=1e-12)
    assert out.mean() == pytest.approx(0.7, abs=1e-12)


def test_owl_linear_ratios_and_inverse_mirror():
    # r = 1..5, S = 0.5, λ = 0.1: r̃ = [0, .05, .1, .15, .2], density = r̃ − 0.1 + 0.5
    np.testing.assert_allclose(owl([1, 2, 3, 4, 5], 0.5, 0.1), [0.6, 0.55, 0.5, 0.45, 0.4], atol=1e-12)
    np.testing.assert_allclose(owl_inverse([1, 2, 3, 4, 5], 0.5, 0.1), [0.4, 0.45, 0.5, 0.55, 0.6], atol=1e-12)


def test_owl_spread_is_two_lambda_but_not_centred_on_s():
    # r = [2, 10, 4, 4, 0]: m̄ = 0.4, so the range is [S − 2λ·0.6, S + 2λ·0.4] = [0.604, 0.764], not S ± λ
    out = owl([2, 10, 4, 4, 0], 0.7, 0.08)
    assert out.max() - out.min() == pytest.approx(0.16, abs=1e-12)
    assert out.min() == pytest.approx(0.7 - 2 * 0.08 * 0.6) and out.max() == pytest.approx(0.7 + 2 * 0.08 * 0.4)
    assert out.min() < 0.7 - 0.08  # outside the paper's band


def test_owl_equal_ratios_is_uniform():
    np.testing.assert_array_equal(owl([3, 3, 3, 3, 3], 0.6, 0.2), np.full(5, 0.6))


def test_owl_lambda_too_wide_names_allowed_range():
    # m̄ = mean(r / 10) = 0.4 → OWL needs λ < (1 − 0.7) / (2 · 0.4) = 0.375 and λ ≤ 0.7 / (2 · 0.6) = 0.5833
    r = [2, 10, 4, 4, 0]
    assert owl_lambda_max(r, 0.7) == pytest.approx(0.375)
    assert owl_lambda_max(r, 0.7, inverse=True) == pytest.approx(min(0.3 / 1.2, 0.7 / 0.8))
    with pytest.raises(ValueError, match=r"0 ≤ λ < 0\.3750"):
        owl(r, 0.7, 0.4)
    with pytest.raises(ValueError, match=r"0 ≤ λ < 0\.3750"):
        owl(r, 0.7, 0.375)  # the lightest block would reach sparsity exactly 1
    assert owl(r, 0.7, 0.37).max() < 1
    with pytest.raises(ValueError, match="λ"):
        owl(r, 0.7, -0.01)


def test_er_by_hand():
    # shapes (4,4) and (2,8): raw density 8/16 = 0.5 and 10/16 = 0.625; keep 16 of 32 → ε = 16 / (8 + 10)
    eps = 16 / 18
    np.testing.assert_allclose(er([(4, 4), (2, 8)], 0.5), [1 - 0.5 * eps, 1 - 0.625 * eps], atol=1e-12)


def test_er_keeps_tiny_layer_dense_and_rescales():
    # (1,1) would need density 4.59 > 1 → dense; the (10,10) layer then keeps 49.5 of 100 weights.
    np.testing.assert_allclose(er([(1, 1), (10, 10)], 0.5), [0.0, 0.505], atol=1e-12)


def test_global_threshold_by_hand():
    hist = [[2, 2, 0, 0], [0, 1, 2, 1]]  # N = 8; S = 0.5 → prune 4: bin 0 (2) + 2/3 of bin 1 (3)
    np.testing.assert_allclose(global_threshold(hist, 0.5), [(2 + 2 * 2 / 3) / 4, (2 / 3) / 4], atol=1e-12)
    with pytest.raises(AllocationRefused, match=r"layer\(s\) \[0\]"):
        global_threshold(hist, 0.625)  # the whole of layer 0 falls below the threshold


class _Inputs:
    """Minimal AllocationInputs: 3 blocks × 2 layers."""

    layer_block = np.array([0, 0, 1, 1, 2, 2])
    layer_shapes = np.array([[4, 4], [8, 4]] * 3)
    score_hist = np.array([[4, 6, 6], [10, 12, 10], [2, 8, 6], [4, 14, 14], [8, 4, 4], [6, 20, 6]])
    layer_alpha = np.array([2.0, 2.5, 3.0, 3.5, 4.0, 6.0])
    block_mean_score = np.array([1.0, 3.0, 2.0])
    n_blocks = 3

    def lod(self, m):
        return np.array([0.01, 0.05, 0.02]) * (5 / m)


@pytest.mark.parametrize("name", formula_allocators())
@pytest.mark.parametrize("S", [0.3, 0.5, 0.7])
def test_registry_invariants(name, S):
    a = allocate(name, _Inputs(), S, **ALLOCATORS[name].pick({"lam": 0.05, "m": 5}))
    assert a.layer_sparsity.shape == (6,) and a.block_sparsity.shape == (3,)
    assert a.overall == pytest.approx(S, abs=1e-6)
    assert np.all(a.layer_sparsity >= 0) and np.all(a.layer_sparsity < 1)
    if ALLOCATORS[name].granularity == "block":
        np.testing.assert_allclose(a.layer_sparsity.reshape(3, 2), np.repeat(a.block_sparsity[:, None], 2, axis=1))


def test_allocate_owl_uses_lod_at_m():
    a = allocate("owl", _Inputs(), 0.5, lam=0.05, m=5)
    np.testing.assert_allclose(a.block_sparsity, owl([0.01, 0.05, 0.02], 0.5, 0.05))
    assert a.params == {"lam": 0.05, "m": 5.0}


def test_allocate_rejects_bad_input():
    with pytest.raises(ValueError, match="choose one of uniform, owl"):
        allocate("nope", _Inputs(), 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        allocate("owl", _Inputs(), 0.0)
    with pytest.raises(ValueError, match=r"M \(m\) must be a number in \[0.01, 9976\]; got 0"):
        allocate("owl", _Inputs(), 0.5, m=0)
    with pytest.raises(ValueError, match="allocator 'uniform' takes no parameter 'lam'; its parameters: none"):
        allocate("uniform", _Inputs(), 0.5, lam=0.1)
    # every declared default lies in its own declared range, and the ranges say what the formulas accept
    for a in ALLOCATORS.values():
        assert a.check({}) == {p.name: p.default for p in a.params}


def test_hill_alpha_by_hand():
    import math

    import torch

    from pruner.engine.layout import hill_alpha, layer_alpha

    # ascending [1, 2, 4, 8], tail = the upper half [4, 8] with x_min = 4: α = 1 + 2 / (ln 1 + ln 2)
    assert hill_alpha([8, 1, 4, 2]) == pytest.approx(1 + 2 / math.log(2))
    # eigenvalues of WᵀW are the squared singular values: diag(1, √2, 2, √8) gives the same spectrum
    w = torch.diag(torch.tensor([1.0, 2**0.5, 2.0, 8**0.5]))
    assert layer_alpha(w) == pytest.approx(1 + 2 / math.log(2))
    with pytest.raises(ValueError, match="flat"):
        hill_alpha([3, 3, 3, 3])


def test_alpha_pruning_by_hand():
    from pruner.allocation import alpha_pruning

    # S = 0.5: ε = 0.3·S = 0.15; α ↦ [0.35, 0.5, 0.65] linearly; equal sizes, so the mean is already S
    assert alpha_pruning([2.0, 3.0, 4.0], [1, 1, 1], 0.5) == pytest.approx([0.35, 0.5, 0.65])
    # a double-size first block pulls the weighted mean to 0.4625: everything shifts up by 0.0375
    assert alpha_pruning([2.0, 3.0, 4.0], [2, 1, 1], 0.5) == pytest.approx([0.3875, 0.5375, 0.6875])
    # S = 0.8: ε is capped at half the headroom, (1 − 0.8) / 2 = 0.1
    assert alpha_pruning([1.0, 5.0], [1, 1], 0.8) == pytest.approx([0.7, 0.9])
    # ε fraction 1 at S = 0.2: ε = min(0.2, 0.4) = 0.2, s = [0, 0.4] before the shift; the heavy second block pulls
    # the weighted mean to (0 + 1000 · 0.4)/1001, so the shift of 0.2 − 0.3996 takes block 0 below 0: refused
    with pytest.raises(AllocationRefused, match=r"leave \[0, 1\) at S = 0.2 \(range -0.200…0.200\)"):
        alpha_pruning([1.0, 5.0], [1, 1000], 0.2, epsilon_fraction=1.0)
    # equal α everywhere: uniform
    assert alpha_pruning([3.0, 3.0], [1, 3], 0.6) == pytest.approx([0.6, 0.6])


def test_dlp_worked_by_hand_on_four_blocks():
    """Ā = [1, 2, 3, 4]: i = 1 − Ā/10 = [0.9, 0.8, 0.7, 0.6]; with α = 0.1, ĩ = (i − 0.6)/0.3 · 0.2 =
    [0.2, 2/15, 1/15, 0], mean 0.1; density = ĩ − 0.1 + 0.5 = [0.6, 8/15, 7/15, 0.4]; s = 1 − density."""
    np.testing.assert_allclose(dlp_importance([1.0, 2.0, 3.0, 4.0]), [0.9, 0.8, 0.7, 0.6])
    np.testing.assert_allclose(dlp([1.0, 2.0, 3.0, 4.0], 0.5, 0.1), [0.4, 7 / 15, 8 / 15, 0.6])
    # a scale of the scores changes nothing; equal scores are uniform
    np.testing.assert_allclose(dlp([10.0, 20.0, 30.0, 40.0], 0.5, 0.1), dlp([1.0, 2.0, 3.0, 4.0], 0.5, 0.1))
    np.testing.assert_allclose(dlp([2.0, 2.0, 2.0], 0.7, 0.15), [0.7, 0.7, 0.7])


def test_dlp_alpha_too_wide_and_bad_scores_name_the_allowed_range():
    # S = 0.9, α = 0.1 on [1, 2, 3, 4]: s reaches 0.9 + 0.1 = 1.0, outside [0, 1); α < 0.1 is allowed
    with pytest.raises(AllocationRefused,
                       match=r"α=0.1 is too wide for S=0.9: DLP .* allowed here: 0 ≤ α < 0.1000"):
        dlp([1.0, 2.0, 3.0, 4.0], 0.9, 0.1)
    with pytest.raises(ValueError, match="each block's mean Wanda score") as malformed:
        dlp([1.0, -1.0], 0.5)
    assert not isinstance(malformed.value, AllocationRefused)  # malformed input is not a refusal
    with pytest.raises(ValueError, match=r"α \(alpha\) must be a number in \[0, 0.5\)"):
        allocate("dlp", _Inputs(), 0.5, alpha=0.5)


def test_atp_worked_by_hand_with_unequal_blocks():
    """n = [1, 1, 2], S = 0.5, δ = 0.1: b̄ = (0 + 1 + 4)/4 = 1.25, s_0 = 0.5 − 0.125 = 0.375, s = [0.375, 0.475,
    0.575]; the weighted mean (0.375 + 0.475 + 2 · 0.575)/4 = 0.5. δ_max = min(0.5/1.25, 0.5/0.75) = 0.4."""
    np.testing.assert_allclose(atp([1, 1, 2], 0.5, 0.1), [0.375, 0.475, 0.575])
    assert atp_delta_max([1, 1, 2], 0.5) == pytest.approx(0.4)
    np.testing.assert_allclose(atp([5, 5, 5, 5], 0.5, 0.1), [0.35, 0.45, 0.55, 0.65])
    np.testing.assert_allclose(atp([5, 5], 0.6, 0.0), [0.6, 0.6])  # δ = 0 is uniform
    with pytest.raises(AllocationRefused,
                       match=r"δ=0.5 is too steep for S=0.5 over 3 blocks: .* allowed here: 0 ≤ δ < 0.4000"):
        atp([1, 1, 2], 0.5, 0.5)
    with pytest.raises(ValueError, match="must be ≥ 0") as malformed:
        atp([1, 1], 0.5, -0.1)
    assert not isinstance(malformed.value, AllocationRefused)


def test_allocate_dlp_and_atp_read_block_scores_and_sizes():
    a = allocate("dlp", _Inputs(), 0.5, alpha=0.1)
    np.testing.assert_allclose(a.block_sparsity, dlp([1.0, 3.0, 2.0], 0.5, 0.1))
    b = allocate("atp", _Inputs(), 0.5, delta=0.05)
    np.testing.assert_allclose(b.block_sparsity, [0.45, 0.5, 0.55])
    assert ALLOCATORS["atp"].needs == "layout" and ALLOCATORS["dlp"].needs == "statistics"
