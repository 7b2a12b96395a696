"""Outlier statistics on hand-made weights and norms, with counts worked out by hand."""

import numpy as np
import pytest
import torch

from pruner.core.scores import wanda_score
from pruner.engine.stats import M_GRID, Stats, StatsBuilder, counts_above, histogram


def _two_layer_block():
    # Layer a: |W| = [[1, 2], [0, 4]], ‖X‖ = [1, 0.5] → A = [[1, 1], [0, 2]]
    # Layer b: |W| = [[3, 1, 0]],      ‖X‖ = [1, 2, 1] → A = [[3, 2, 0]]
    # Block: scores {1, 1, 0, 2, 3, 2, 0}, sum 9, count 7, Ā = 9/7
    w = [torch.tensor([[1.0, -2.0], [0.0, 4.0]]), torch.tensor([[3.0, -1.0, 0.0]])]
    n = [torch.tensor([1.0, 0.5]), torch.tensor([1.0, 2.0, 1.0])]
    return ["a", "b"], w, n


def _stats(*blocks) -> Stats:
    b = StatsBuilder()
    for names, w, n in blocks:
        b.add_block(names, w, n)
    return b.result()


def test_wanda_score():
    names, w, n = _two_layer_block()
    torch.testing.assert_close(wanda_score(w[0], n[0]), torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64))


def test_counts_above_is_strict():
    v = torch.tensor([0.5, 1.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.5, 3.0], dtype=torch.float64)
    assert counts_above(v, t).tolist() == [5, 2, 1, 0]


def test_histogram_bins_are_left_open():
    v = torch.tensor([0.0, 1.0, 1.5, 2.0, 9.0], dtype=torch.float64)
    assert histogram(v, torch.tensor([1.0, 2.0], dtype=torch.float64)).tolist() == [2, 2, 1]


def test_lod_by_hand():
    s = _stats(_two_layer_block())
    assert s.block_mean_score[0] == pytest.approx(9 / 7)
    # M = 1: threshold 9/7 ≈ 1.286 → {2, 3, 2};  M = 2: 18/7 ≈ 2.571 → {3};  M = 1.5: 1.929 → {2, 3, 2}
    np.testing.assert_allclose(s.lod(1), [3 / 7])
    np.testing.assert_allclose(s.lod(2), [1 / 7])
    np.testing.assert_allclose(s.lod(1.5), [3 / 7])
    # per layer at M = 0.7 (threshold 0.9): a → {1, 1, 2} of 4, b → {3, 2} of 3
    np.testing.assert_allclose(s.layer_outlier_ratios(0.7), [3 / 4, 2 / 3])
    np.testing.assert_allclose(s.layer_outlier_ratios(1), [1 / 4, 2 / 3])


def test_lod_threshold_is_strictly_greater():
    # A = [1, 1, 1, 5], Ā = 2: at M = 2.5 the score 5 equals the threshold and is not an outlier.
    s = _stats((["x"], [torch.tensor([[1.0, 1.0, 1.0, 5.0]])], [torch.ones(4)]))
    np.testing.assert_array_equal(s.lod(2.5), [0.0])
    np.testing.assert_array_equal(s.lod(2.49), [0.25])
    np.testing.assert_array_equal(s.lod(0.1 + 0.2), [1.0])  # round-off in M still hits the grid point 0.3


def test_lod_between_grid_points_interpolates():
    s = _stats((["x"], [torch.tensor([[1.0, 1.0, 1.0, 5.0]])], [torch.ones(4)]))
    # 2.495 lies halfway between 2.49 (1 outlier) and 2.50 (0 outliers)
    np.testing.assert_allclose(s.lod(2.495), [0.125])


def test_lod_rejects_m_outside_grid():
    s = _stats(_two_layer_block())
    with pytest.raises(ValueError, match=r"M must be in \[0.01, 9976\]"):
        s.lod(0)
    with pytest.raises(ValueError, match="M must be in"):
        s.lod(1e6)


def test_blocks_are_independent_and_outlier_matrix():
    names, w, n = _two_layer_block()
    s = _stats((names, w, n), (names, [x * 10 for x in w], n))  # scaling a block's weights changes nothing
    np.testing.assert_allclose(s.lod(1), [3 / 7, 3 / 7])
    assert s.outlier_matrix(1).shape == (2, 2)
    assert s.n_blocks == 2 and s.block_numel.tolist() == [7, 7]
    assert s.layers_per_block == ["a", "b"]


def test_ratio_distribution_counts_everything():
    s = _stats(_two_layer_block())
    edges, counts = s.ratio_distribution(0)
    assert counts.sum() == 7
    assert counts[0] == 2  # the two zero scores fall at or below the first edge (0.01)
    # the scores 2 (ratio 14/9 ≈ 1.56, twice) and 3 (ratio 2.33) land in the bins containing those ratios
    for ratio, expected in ((14 / 9, 2), (21 / 9, 1)):
        i = np.searchsorted(edges, ratio)  # bin (edges[i-1], edges[i]]
        assert counts[i] == expected
    with pytest.raises(ValueError, match="block must be in"):
        s.ratio_distribution(5)


def test_score_histogram_feeds_global():
    s = _stats(_two_layer_block())
    assert s.score_hist.sum(axis=1).tolist() == [4, 3]
    assert s.score_hist[:, 0].tolist() == [1, 1]  # one zero score per layer lands in the underflow bin


def test_save_load_roundtrip(tmp_path):
    names, w, n = _two_layer_block()
    s = _stats((names, w, n), (names, w, n))
    s.meta["note"] = "x"
    s.save(tmp_path)
    t = Stats.load(tmp_path)
    assert t.layer_names == s.layer_names and t.meta == {"note": "x"}
    np.testing.assert_array_equal(t.ratio_counts_above, s.ratio_counts_above)
    for a, b in zip(t.input_norms, s.input_norms):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(t.lod(1.5), s.lod(1.5))


def test_grid_is_exact_at_two_decimals():
    assert M_GRID[499] == 5.0 and M_GRID[0] == 0.01
    assert np.all(np.diff(M_GRID) > 0)
