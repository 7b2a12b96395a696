"""Each method's mask on hand-made tensors (exact), ties, N:M, and SparseGPT's reconstruction advantage."""

import pytest
import torch

from pruner.methods import METHODS, NM
from pruner.methods.masks import lowest_mask, nm_mask, prune_count
from pruner.methods.sparsegpt import HessianNotPositiveDefinite

T, F = True, False


def test_row_scope_exact_with_ties_broken_by_position():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 2.0, 2.0, 1.0]])
    assert lowest_mask(scores, 0.5, "row").tolist() == [[T, T, F, F], [F, T, F, T]]


def test_layer_scope_exact():
    scores = torch.tensor([[1.0, 5.0], [2.0, 2.0]])
    assert lowest_mask(scores, 0.5, "layer").tolist() == [[T, F], [T, F]]
    assert lowest_mask(scores, 0.75, "layer").tolist() == [[T, F], [T, T]]


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_lowest_mask_equals_a_stable_sort_prefix(scope, sparsity):
    """The k-th-value selection must pick exactly what a stable sort's first k positions pick, ties included."""
    torch.manual_seed(1)
    scores = torch.randint(0, 5, (37, 23)).float()  # 5 distinct values: ties everywhere
    groups = scores.reshape(1, -1) if scope == "layer" else scores
    k = prune_count(groups.shape[1], sparsity)
    expected = torch.zeros_like(groups, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(groups, dim=1, stable=True)[:, :k], True)
    assert torch.equal(lowest_mask(scores, sparsity, scope), expected.reshape(scores.shape))


def test_prune_count_rounds_and_validates():
    assert prune_count(576, 0.7) == 403 and prune_count(10, 0.0) == 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_count(10, 1.0)


def test_nm_mask_2_4():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 5.0, 1.0], [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]])
    assert nm_mask(scores, NM(2, 4)).tolist() == [[F, T, F, T, T, F, F, T], [T, T, F, F, T, T, F, F]]
    assert nm_mask(torch.arange(8.0)[None], NM(4, 8)).tolist() == [[T, T, T, T, F, F, F, F]]
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.ones(2, 6), NM(2, 4))


def test_nm_parse():
    assert NM.parse("2:4") == NM(2, 4) and NM.parse("4:8").sparsity == 0.5
    with pytest.raises(ValueError, match="1 ≤ N < M"):
        NM.parse("4:2")
    with pytest.raises(ValueError, match="like 2:4"):
        NM.parse("2-4")


def test_magnitude_by_hand():
    W = torch.tensor([[-3.0, 1.0], [0.5, 2.0]])
    Wp, mask = METHODS["magnitude"](2).prune(W, 0.5)
    assert Wp.tolist() == [[-3.0, 0.0], [0.0, 2.0]] and mask.sum() == 2


def test_wanda_by_hand_row_and_layer_scope():
    # ‖X‖ = [2, 1] → scores [[2, 2], [6, 1]]
    W = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    row = METHODS["wanda"](2)
    row.accumulate(torch.tensor([[2.0, 1.0]]))
    Wp, _ = row.prune(W, 0.5)
    assert Wp.tolist() == [[0.0, 2.0], [3.0, 0.0]]  # row 0: tie, first position goes
    # W2 = [[1, 1], [3, 4]] → scores [[2, 1], [6, 4]]: per row prune 1 and 4; per layer the two smallest, 1 and 2
    W2 = torch.tensor([[1.0, 1.0], [3.0, 4.0]])
    Wp, _ = row.prune(W2, 0.5)
    assert Wp.tolist() == [[1.0, 0.0], [3.0, 0.0]]
    layer = METHODS["wanda"](2, scope="layer")
    layer.accumulate(torch.tensor([[2.0, 1.0]]))
    Wp, _ = layer.prune(W2, 0.5)
    assert Wp.tolist() == [[0.0, 0.0], [3.0, 4.0]]


def test_wanda_accumulates_over_batches():
    a, b = METHODS["wanda"](3), METHODS["wanda"](3)
    x = torch.randn(10, 3)
    a.accumulate(x)
    b.accumulate(x[:4])
    b.accumulate(x[4:])
    torch.testing.assert_close(a.sumsq, b.sumsq)


def _correlated_layer(seed=0, n=2048, din=256, dout=64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(din, din, generator=g) / din**0.5
    X = torch.randn(n, din, generator=g) @ mix + 0.1 * torch.randn(n, din, generator=g)
    X[:, :8] *= 10  # a few outlier features
    return X, torch.randn(dout, din, generator=g)


def _error(X, W, Wp):
    return float(((X @ W.T - X @ Wp.T) ** 2).sum())


@pytest.mark.parametrize("sparsity, nm", [(0.5, None), (0.6, None), (0.7, None), (0.5, NM(2, 4))])
def test_sparsegpt_reconstructs_better_than_wanda(sparsity, nm):
    X, W = _correlated_layer()
    errors, masks = {}, {}
    for name in ("wanda", "sparsegpt"):
        m = METHODS[name](W.shape[1])
        m.accumulate(X)
        Wp, masks[name] = m.prune(W, sparsity, nm)
        errors[name] = _error(X, W, Wp)
        assert torch.equal(Wp == 0, masks[name])  # exactly the masked weights are zero
    assert errors["sparsegpt"] < 0.85 * errors["wanda"]
    if nm is None:  # exact count per block of 128 columns (64 rows × 128 = 8192 weights each)
        per_block = masks["sparsegpt"].reshape(64, 2, 128).sum(dim=(0, 2))
        assert per_block.tolist() == [prune_count(8192, sparsity)] * 2
    else:
        assert (masks["sparsegpt"].reshape(64, -1, 4).sum(-1) == 2).all()


def _textbook_sparsegpt(W, H, sparsity, block=128, dampening=0.01):
    """SparseGPT without lazy batching: one column at a time, the mask chosen at the start of each block of
    columns from the current weights (float64), as the paper's Algorithm 1 states it."""
    W = W.double().clone()
    H = H.double().clone()
    H.diagonal().add_(dampening * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(W.shape[1]):
        if j % block == 0:
            cols = slice(j, min(j + block, W.shape[1]))
            scores = W[:, cols] ** 2 / U.diagonal()[cols] ** 2
            mask[:, cols] = lowest_mask(scores, sparsity, "layer")
        e = W[:, j] * mask[:, j] / U[j, j]
        W[:, j:] -= torch.outer(e, U[j, j:])
    W[mask] = 0
    return W, mask


def test_sparsegpt_equals_the_textbook_column_by_column_algorithm():
    torch.manual_seed(2)
    n = 300  # two full blocks of 128 columns and a partial one
    X = torch.randn(2000, n) @ (torch.eye(n) + 0.2 * torch.randn(n, n))
    W = (torch.randn(40, n) * 4).round() / 4  # quantized weights: many tied scores
    m = METHODS["sparsegpt"](n)
    m.accumulate(X)
    got, got_mask = m.prune(W, 0.6)
    expected, expected_mask = _textbook_sparsegpt(W, X.double().T @ X.double(), 0.6)
    assert torch.equal(got_mask, expected_mask)
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-4)


def test_sparsegpt_zero_sparsity_changes_nothing():
    X, W = _correlated_layer(n=512)
    m = METHODS["sparsegpt"](W.shape[1])
    m.accumulate(X)
    Wp, mask = m.prune(W, 0.0)
    assert not mask.any()
    torch.testing.assert_close(Wp, W)


def test_sparsegpt_reports_non_positive_definite_hessian():
    m = METHODS["sparsegpt"](4)
    m.H = -torch.eye(4)
    with pytest.raises(HessianNotPositiveDefinite, match="not positive definite even after 1% dampening"):
        m.prune(torch.ones(2, 4), 0.5)


@pytest.mark.parametrize("n, block", [(5, 2), (8, 8), (10, 3), (7, 100)])
def test_blocked_gram_equals_xtx(n, block):
    from pruner.methods.sparsegpt import add_gram_

    x = torch.randn(50, n, dtype=torch.float64)
    H = torch.ones(n, n, dtype=torch.float64)
    add_gram_(H, x, block)
    torch.testing.assert_close(H, 1 + x.T @ x)


def test_sparsegpt_layers_sharing_inputs_pruned_together_equal_one_by_one():
    """q/k/v (and gate/up) share H: the stacked walk must give each layer exactly what pruning it alone gives,
    with its own sparsity or N:M (OBS updates each output row independently)."""
    torch.manual_seed(0)
    n = 64
    x = torch.randn(512, n) @ torch.randn(n, n)
    weights = [torch.randn(48, n), torch.randn(16, n), torch.randn(16, n)]
    for targets in ([(0.6, None), (0.75, None), (0.5, None)], [(0.5, NM(2, 4)), (0.6, None), (0.75, NM(1, 4))]):
        alone = METHODS["sparsegpt"](n)
        alone.accumulate(x)
        expected = [alone.prune(w, s, nm) for w, (s, nm) in zip(weights, targets)]
        together = METHODS["sparsegpt"](n)
        together.accumulate(x)
        got = together.prune_many([(w, s, nm) for w, (s, nm) in zip(weights, targets)])
        for (w_exp, m_exp), (w_got, m_got), (s, _) in zip(expected, got, targets):
            assert torch.equal(m_exp, m_got) and torch.allclose(w_exp, w_got, atol=1e-6)
            assert abs(m_got.float().mean().item() - s) <= 0.5 / m_got.numel()  # round(s · size) weights


def test_cubic_schedule_by_hand():
    from pruner.methods.admm import cubic_schedule

    s = cubic_schedule(0.6, steps=3)  # 0.6 − 0.6·(1 − t/3)³: t=1 → 0.6·(1 − 8/27), t=2 → 0.6·(1 − 1/27), t=3 → 0.6
    assert s == pytest.approx([0.6 * 19 / 27, 0.6 * 26 / 27, 0.6])
    assert len(cubic_schedule(0.7)) == 15 and cubic_schedule(0.7)[-1] == pytest.approx(0.7)


@pytest.mark.parametrize("name", ["admm", "admm-gradual"])
def test_admm_reconstructs_better_than_wanda_and_sparsegpt(name):
    X, W = _correlated_layer()
    errors = {}
    for method in ("wanda", "sparsegpt", name):
        m = METHODS[method](W.shape[1])
        m.accumulate(X)
        Wp, mask = m.prune(W, 0.6)
        errors[method] = _error(X, W, Wp)
        assert torch.equal(Wp == 0, mask)
        assert (mask.sum(dim=1) == prune_count(W.shape[1], 0.6)).all() or method == "sparsegpt"  # exact per row
    assert errors[name] < errors["sparsegpt"] < errors["wanda"]


def test_admm_error_decreases_with_iterations_and_keeps_the_wanda_mask():
    from pruner.methods.admm import ADMM

    X, W = _correlated_layer(seed=1)
    wanda = METHODS["wanda"](W.shape[1])
    wanda.accumulate(X)
    _, wanda_mask = wanda.prune(W, 0.6)
    errors = []
    for iterations in (1, 3, 10, 30):
        m = ADMM(W.shape[1], iterations=iterations)
        m.accumulate(X)
        Wp, mask = m.prune(W, 0.6)
        assert torch.equal(mask, wanda_mask)  # ADMM moves the kept weights, not the mask
        errors.append(_error(X, W, Wp))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.8 * errors[0]


def test_admm_nm_keeps_the_pattern():
    X, W = _correlated_layer(seed=2)
    for name in ("admm", "admm-gradual"):
        m = METHODS[name](W.shape[1])
        m.accumulate(X)
        Wp, mask = m.prune(W, 0.5, NM(2, 4))
        assert (mask.reshape(64, -1, 4).sum(-1) == 2).all() and torch.equal(Wp == 0, mask)
