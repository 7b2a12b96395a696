"""The perplexity predictor (pruner/predictor.py): interpolation worked by hand, the damage table checked against
independent whole-model forwards on the tiny Llama."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from pruner.model.catalogue import ModelSpec
from pruner.predictor.cache import get_damage_table
from pruner.predictor.measure import build_damage_table, holdout_windows, measure_allocations
from pruner.predictor.table import DEFAULT_GRID, DamageTable, PredictorSpec
from pruner.specs import CalibSpec, PruneSpec, StatsSpec


def test_prediction_worked_by_hand():
    """Two blocks, grid (0.4, 0.8), two windows with dense NLL 1 and 2. Block 0 at 0.4 adds 0.2 and 0.4 to the
    windows, block 1 at 0.8 adds 1.0 and 0.6. s = (0.2, 0.8): block 0 adds half its 0.4 damage (0.1, 0.2), block
    1 its full (1.0, 0.6): NLL = (2.1, 2.8), perplexity exp(2.45); interval exp(2.45 ± 12.706 · 0.35)."""
    table = DamageTable(grid=np.array([0.4, 0.8]), dense_nll=np.array([1.0, 2.0]),
                        window_nll=np.array([[[1.2, 2.4], [1.5, 2.9]],
                                             [[1.1, 2.1], [2.0, 2.6]]]), block_numel=np.array([10, 10]))
    p = table.predict([0.2, 0.8])
    assert p.perplexity == pytest.approx(math.exp(2.45))
    half_width = 12.706204736 * 0.35  # t(0.975, 1) · sd([2.1, 2.8]) / √2 = t · 0.35
    assert p.low == pytest.approx(math.exp(2.45 - half_width)) and p.high == pytest.approx(math.exp(2.45 + half_width))
    np.testing.assert_allclose(p.block_delta_nll, [0.15, 0.8])
    assert table.predict([0.0, 0.0]).perplexity == pytest.approx(math.exp(1.5))  # dense
    with pytest.raises(ValueError, match=r"must lie in \[0, 0.8\], the range the damage table measured"):
        table.predict([0.9, 0.1])
    with pytest.raises(ValueError, match=r"one sparsity per block \(2\)"):
        table.predict([0.1])


def test_operating_point_prediction_worked_by_hand():
    """An operating-point table (anchor 0.5: the reference has both blocks at 0.5, NLL 3 on one window) with grid
    (0.3, 0.7): block 0 at 0.3 takes 0.4 off, at 0.7 adds 1.0; block 1 at 0.3 takes 0.2 off, at 0.7 adds 0.6.
    s = (0.6, 0.4): block 0 is halfway to 0.7 (+0.5), block 1 halfway to 0.3 (−0.1): NLL 3.4. The range is
    [0.3, 0.7], and the predictor-optimal allocation at S = 0.5 moves sparsity from block 0 to block 1 as far as
    the convex costs allow: (0.3, 0.7) costs −0.4 + 0.6 = +0.2, (0.5, 0.5) costs 0, (0.4, 0.6) costs −0.2 + 0.3 =
    +0.1; so uniform wins at S = 0.5 on a 0.1 lattice."""
    from pruner.predictor.optimal import optimal_block_sparsity

    table = DamageTable(grid=np.array([0.3, 0.7]), dense_nll=np.array([3.0]),
                        window_nll=np.array([[[2.6], [4.0]], [[2.8], [3.6]]]), block_numel=np.array([10, 10]),
                        anchor=0.5)
    np.testing.assert_allclose(table.points(), [0.3, 0.5, 0.7])
    np.testing.assert_allclose(table.delta()[:, :, 0], [[-0.4, 0.0, 1.0], [-0.2, 0.0, 0.6]])
    assert table.predict([0.6, 0.4]).perplexity == pytest.approx(math.exp(3.4))
    assert table.predict([0.5, 0.5]).perplexity == pytest.approx(math.exp(3.0))
    with pytest.raises(ValueError, match=r"must lie in \[0.3, 0.7\]"):
        table.predict([0.2, 0.5])
    np.testing.assert_allclose(optimal_block_sparsity(table, 0.5, step=0.1), [0.5, 0.5])
    # where block 1 is cheap to prune harder, the programme moves sparsity there, never below the range
    cheap = DamageTable(grid=np.array([0.3, 0.7]), dense_nll=np.array([3.0]),
                        window_nll=np.array([[[2.0], [4.0]], [[2.8], [3.1]]]), block_numel=np.array([10, 10]),
                        anchor=0.5)
    np.testing.assert_allclose(optimal_block_sparsity(cheap, 0.5, step=0.1), [0.3, 0.7])
    # within a trust region of ±0.1 the best move is (0.4, 0.6): −0.5 + 0.05
    np.testing.assert_allclose(optimal_block_sparsity(cheap, 0.5, step=0.1, reach=0.1), [0.4, 0.6])
    stats = StatsSpec(ModelSpec("smollm2-135m"), CalibSpec())
    with pytest.raises(ValueError, match="must not contain the operating point"):
        PredictorSpec(stats, grid=(0.3, 0.5), around=0.5)
    with pytest.raises(ValueError, match=r"operating point S₀ must lie in \(0, 1\)"):
        PredictorSpec(stats, around=1.0)
    assert PredictorSpec(stats, around=0.7).grid == (0.4, 0.5, 0.6, 0.65, 0.8, 0.9, 0.95)
    assert PredictorSpec(stats).grid == DEFAULT_GRID


def test_compounding_fit_worked_by_hand():
    """Anchor 0.5, one window, reference NLL 1.0; grid (0.3, 0.7): block 0 at 0.3 → −0.1, at 0.7 → +0.2; block 1 at
    0.3 → −0.05, at 0.7 → +0.4. Probes and their features (2 Σ_{b<c} of damages' products, of gains' products):
      A (0.7, 0.7): damages 0.2, 0.4  → (2 · 0.08 = 0.16, 0);  additive 1.6
      B (0.3, 0.3): gains −0.1, −0.05 → (0, 2 · 0.005 = 0.01); additive 0.85
      C (0.7, 0.3): one damage, one gain → (0, 0);              additive 1.15
    Measured 1.68, 0.87, 1.15 are the additive values plus 0.5 · first + 2 · second feature: the fit recovers
    (γ₊, γ₋) = (0.5, 2) exactly. A block moved alone has no pair: its table row is predicted exactly."""
    from pruner.predictor.compounding import probe_allocations
    from pruner.predictor.table import compounding_features, fit_compounding, nonnegative_least_squares

    table = DamageTable(grid=np.array([0.3, 0.7]), dense_nll=np.array([1.0]),
                        window_nll=np.array([[[0.9], [1.2]], [[0.95], [1.4]]]), block_numel=np.array([10, 10]),
                        anchor=0.5)
    probes = np.array([[0.7, 0.7], [0.3, 0.3], [0.7, 0.3]])
    np.testing.assert_allclose(compounding_features(table.per_block_delta(probes[0])), [[0.16, 0.0]])
    np.testing.assert_allclose(compounding_features(table.per_block_delta(probes[1])), [[0.0, 0.01]])
    np.testing.assert_allclose(compounding_features(table.per_block_delta(probes[2])), [[0.0, 0.0]], atol=1e-15)
    measured = np.array([[1.68], [0.87], [1.15]])
    np.testing.assert_allclose(fit_compounding(table, probes, measured), [0.5, 2.0], rtol=1e-9)
    assert table.predict([0.7, 0.7]).perplexity == pytest.approx(math.exp(1.6))  # no probes: additive
    table.compounding = {"probes": probes.tolist(), "probe_nll": measured.tolist()}
    p = table.predict([0.7, 0.7])
    assert p.perplexity == pytest.approx(math.exp(1.68)) and p.compounding_nll == pytest.approx(0.08)
    assert table.predict([0.3, 0.3]).perplexity == pytest.approx(math.exp(0.87))
    assert table.predict([0.7, 0.5]).perplexity == pytest.approx(math.exp(1.2))  # alone: the table row
    assert table.predict([0.7, 0.7], compounding=False).perplexity == pytest.approx(math.exp(1.6))
    # measured below the additive sum on the damaging probe: γ₊ would be negative, so it is 0 (direction stated)
    gamma = fit_compounding(table, probes[:1], np.array([[1.5]]))  # below the additive 1.6
    np.testing.assert_array_equal(gamma, [0.0, 0.0])
    # non-negative least squares by hand: y = 2·x₁ − 1·x₂ exactly, the best with x ≥ 0 drops x₂
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(nonnegative_least_squares(a, np.array([2.0, -1.0, 1.0])), [1.5, 0.0])
    # probes: seeded, inside the table's range, spread as asked, none the uniform allocation
    a, b = probe_allocations(table, 4, seed=3), probe_allocations(table, 4, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0.3 and a.max() <= 0.7
    np.testing.assert_allclose(np.abs(a - 0.5).max(axis=1), [0.05, 0.1, 0.15, 0.2], atol=1e-4)


def test_spec_names_what_is_allowed():
    stats = StatsSpec(ModelSpec("smollm2-135m"), CalibSpec())
    with pytest.raises(ValueError, match="wanda or magnitude masks"):
        PredictorSpec(stats, method="sparsegpt")
    with pytest.raises(ValueError, match="increasing values in"):
        PredictorSpec(stats, grid=(0.5, 0.3))
    with pytest.raises(ValueError, match="integer ≥ 2"):
        PredictorSpec(stats, windows=1)


@pytest.fixture(scope="module")
def built(tiny_folder, data_dir, tmp_path_factory):
    from pruner.engine.artifacts import get_stats
    from pruner.model.loading import load_model

    cache = tmp_path_factory.mktemp("predictor-cache")
    spec = PredictorSpec(StatsSpec(ModelSpec(tiny_folder, device="cpu"), CalibSpec(nsamples=4, seqlen=32,
                                                                                    data_dir=data_dir)),
                         windows=3, window_tokens=48, grid=(0.3, 0.6, 0.9))
    loaded = load_model(spec.stats.model)
    before = {n: p.clone() for n, p in loaded.model.state_dict().items()}
    table = get_damage_table(spec, cache, data_dir=data_dir, loaded=loaded)
    return spec, cache, loaded, before, table, get_stats(spec.stats, cache)


def _whole_model_nll(model, windows) -> np.ndarray:
    """Per-window mean NLL by the evaluation module's whole-model path (an independent route)."""
    from pruner.evaluate.perplexity import perplexity_of_chunks

    _, _, per_chunk = perplexity_of_chunks(model, windows, torch.device("cpu"), 1, None, None)
    return np.array(per_chunk)


def test_table_matches_whole_model_forwards(built, data_dir):
    from pruner.core.scores import wanda_score
    from pruner.engine.besa import block_input_norms
    from pruner.methods.masks import lowest_mask
    from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix

    spec, _, loaded, before, table, stats = built
    windows = holdout_windows(loaded.tokenizer, data_dir, spec.windows, spec.window_tokens)
    np.testing.assert_allclose(table.dense_nll, _whole_model_nll(loaded.model, windows), rtol=1e-6)
    # block 2 alone at 0.6, pruned on a copy with the same Wanda masks, through the whole model
    b, k = 2, 1
    model = copy.deepcopy(loaded.model)
    norms = block_input_norms(stats)[b]
    for name, layer in prunable_layers(find_blocks(model)[1][b]).items():
        w = weight_matrix(layer)
        w.data.copy_(w * ~lowest_mask(wanda_score(w, norms[name]), spec.grid[k], "row"))
    np.testing.assert_allclose(table.window_nll[b, k], _whole_model_nll(model, windows), rtol=1e-6)
    # building the table left the model as it was
    after = loaded.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    # one block alone at a grid point is predicted exactly (additivity is exact for a single block)
    s = np.zeros(table.n_blocks)
    s[b] = spec.grid[k]
    assert table.predict(s).perplexity == pytest.approx(math.exp(table.window_nll[b, k].mean()), rel=1e-12)
    assert table.block_numel.tolist() == [float(n) for n in stats.block_numel]
    assert np.all(table.window_nll[:, -1].mean(axis=1) > table.dense_nll.mean())  # 90% of a block hurts


def test_operating_point_table_matches_whole_model_forwards(built, data_dir):
    """Around S₀ = 0.5 the reference is every block pruned at 0.5 and block b is then set to a grid point; both are
    checked against whole-model forwards of copies pruned with the same Wanda masks. The model leaves dense."""
    import dataclasses

    from pruner.core.scores import wanda_score
    from pruner.engine.besa import block_input_norms
    from pruner.methods.masks import lowest_mask
    from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix

    spec, _, loaded, before, _, stats = built
    around = dataclasses.replace(spec, around=0.5)
    assert around.key() != spec.key()
    table = build_damage_table(loaded.model, loaded.tokenizer, stats, around, data_dir)
    assert table.anchor == 0.5
    windows = holdout_windows(loaded.tokenizer, data_dir, spec.windows, spec.window_tokens)

    def pruned(block_sparsity) -> np.ndarray:
        model = copy.deepcopy(loaded.model)
        for b, block in enumerate(find_blocks(model)[1]):
            norms = block_input_norms(stats)[b]
            for name, layer in prunable_layers(block).items():
                w = weight_matrix(layer)
                w.data.copy_(w * ~lowest_mask(wanda_score(w, norms[name]), block_sparsity[b], "row"))
        return _whole_model_nll(model, windows)

    np.testing.assert_allclose(table.dense_nll, pruned([0.5] * table.n_blocks), rtol=1e-6)
    b, k = 1, 2  # block 1 at 0.9, the others at 0.5
    s = [0.5] * table.n_blocks
    s[b] = spec.grid[k]
    np.testing.assert_allclose(table.window_nll[b, k], pruned(s), rtol=1e-6)
    assert table.predict(s).perplexity == pytest.approx(math.exp(table.window_nll[b, k].mean()), rel=1e-12)
    # whole allocations in the table's setting: the reference, a table row, and one whose layers differ in a block
    layer_block = np.asarray(stats.layer_block)
    mixed = np.where(np.arange(len(layer_block)) % 2 == 0, 0.3, 0.7)  # alternate layers at 30% and 70%
    measured = measure_allocations(loaded.model, loaded.tokenizer, stats, around,
                                   [np.full(len(layer_block), 0.5), np.asarray(s)[layer_block], mixed], data_dir)
    np.testing.assert_allclose(measured[0], table.dense_nll, rtol=1e-6)
    np.testing.assert_allclose(measured[1], table.window_nll[b, k], rtol=1e-6)
    model = copy.deepcopy(loaded.model)
    for i, (block, name) in enumerate(zip(layer_block, stats.layer_names)):
        w = weight_matrix(prunable_layers(find_blocks(model)[1][block])[name])
        w.data.copy_(w * ~lowest_mask(wanda_score(w, block_input_norms(stats)[block][name]), mixed[i], "row"))
    np.testing.assert_allclose(measured[2], _whole_model_nll(model, windows), rtol=1e-6)
    with pytest.raises(ValueError, match=r"one sparsity in \[0, 1\) per layer"):
        measure_allocations(loaded.model, loaded.tokenizer, stats, around, [np.full(3, 0.5)], data_dir)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_table_is_cached_and_listed(built):
    from pruner.store.layout import CacheLayout

    spec, cache, loaded, _, table, _ = built
    again = get_damage_table(spec, cache, loaded=None)  # no model needed: read from the cache
    np.testing.assert_array_equal(again.window_nll, table.window_nll)
    entries = [e for e in CacheLayout.at(cache).entries() if e.kind == "predictors"]
    assert len(entries) == 1 and entries[0].path.name == spec.key() and entries[0].stale is None


def test_compounding_fit_is_measured_with_the_table_and_added_to_an_older_one(built, data_dir, tmp_path):
    """Building a table also measures the probes whole and stores γ beside it; a table cached without a fit gets
    one (probes only, no rebuild) the next time it is asked for with a model at hand."""
    import shutil

    from pruner.predictor.cache import predictor_dir
    from pruner.predictor.compounding import COMPOUNDING_PROBES, probe_allocations
    from pruner.predictor.table import COMPOUNDING_FILE

    spec, cache, loaded, _, table, stats = built
    fit = table.compounding
    assert fit is not None and (predictor_dir(spec, cache) / COMPOUNDING_FILE).is_file()
    probes = np.asarray(fit["probes"])
    np.testing.assert_array_equal(probes, probe_allocations(table))
    assert probes.shape == (COMPOUNDING_PROBES, table.n_blocks) and np.all(table.gamma >= 0)
    measured = measure_allocations(loaded.model, loaded.tokenizer, stats, spec,
                                   [p[np.asarray(stats.layer_block)] for p in probes], data_dir)
    np.testing.assert_allclose(fit["probe_nll"], measured, rtol=1e-6)
    # an older table (no fit): copied into a fresh cache without its fit, it gains one, the table itself unchanged
    other = tmp_path / "older-cache"
    target = predictor_dir(spec, other)
    shutil.copytree(predictor_dir(spec, cache), target)
    (target / COMPOUNDING_FILE).unlink()
    assert DamageTable.load(target).compounding is None
    steps = []
    again = get_damage_table(spec, other, data_dir=data_dir, loaded=loaded, progress=lambda d, t: steps.append((d, t)))
    np.testing.assert_allclose(again.gamma, table.gamma, rtol=1e-6)
    assert steps[-1] == (COMPOUNDING_PROBES, COMPOUNDING_PROBES)  # only the probes were measured
    np.testing.assert_array_equal(DamageTable.load(target).window_nll, table.window_nll)


def test_magnitude_table_differs_from_wanda(built, data_dir):
    spec, _, loaded, _, table, stats = built
    import dataclasses

    magnitude = build_damage_table(loaded.model, loaded.tokenizer, stats,
                                   dataclasses.replace(spec, method="magnitude"), data_dir)
    np.testing.assert_allclose(magnitude.dense_nll, table.dense_nll)
    assert not np.allclose(magnitude.window_nll, table.window_nll)


def test_spearman_by_hand():
    from pruner.predictor.tuning import spearman

    rho, n = spearman([1, 2, 3, 4], [10, 20, 40, 30])  # one swap: 1 − 6·2/(4·15) = 0.8
    assert rho == pytest.approx(0.8) and n == 4
    assert spearman([1, 2, 2], [1, 2, 3])[0] == pytest.approx(np.corrcoef([1, 2.5, 2.5], [1, 2, 3])[0, 1])
    assert math.isnan(spearman([1, 2], [2, 1])[0])


def _table(delta: list[list[float]], grid) -> DamageTable:
    """A one-window table whose damages are ``delta`` (B, K) on ``grid`` (dense NLL 1)."""
    d = np.asarray(delta, dtype=float)
    return DamageTable(np.asarray(grid, dtype=float), np.array([1.0]), 1.0 + d[:, :, None], np.full(len(d), 100.0))


def test_optimal_allocation_worked_by_hand():
    """Block 0's damage rises slowly (0.1, 0.2, 0.3 at 0.25, 0.5, 0.75), block 1's steeply (0.05, 0.5, 2.0). At
    S = 0.5 in steps of 0.25 the choices with mean 0.5 are (0.75, 0.25): 0.35, (0.5, 0.5): 0.7, (0.25, 0.75): 2.1."""
    from pruner.predictor.optimal import optimal_block_sparsity

    table = _table([[0.1, 0.2, 0.3], [0.05, 0.5, 2.0]], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(optimal_block_sparsity(table, 0.5, step=0.25), [0.75, 0.25])
    with pytest.raises(ValueError, match="above the table's top grid point 0.75"):
        optimal_block_sparsity(table, 0.8, step=0.05)
    with pytest.raises(ValueError, match="not a whole number of 0.25 steps"):
        optimal_block_sparsity(table, 0.3, step=0.25)


def test_optimal_allocation_is_exact_against_brute_force():
    import itertools

    from pruner.predictor.optimal import optimal_block_sparsity

    rng = np.random.default_rng(0)
    grid = [0.2, 0.4, 0.6, 0.8]
    table = _table(np.cumsum(rng.random((4, 4)), axis=1).tolist(), grid)  # increasing damages, 4 blocks
    step, S = 0.1, 0.5
    levels = np.arange(9) * step  # 0 … 0.8
    d = table.delta().mean(axis=2)
    cost = lambda combo: sum(np.interp(s, [0.0] + grid, d[b]) for b, s in enumerate(combo))  # noqa: E731
    feasible = [c for c in itertools.product(levels, repeat=4) if abs(sum(c) - 4 * S) < 1e-9]
    best = min(cost(c) for c in feasible)
    got = optimal_block_sparsity(table, S, step=step)
    assert got.mean() == pytest.approx(S) and cost(got) == pytest.approx(best, abs=1e-12)


def test_optimal_allocation_with_compounding_against_brute_force_on_small_tables():
    """Operating-point tables (anchor 0.5, 4 blocks, random gains below 0.5 and damages above) with γ₊ = 3: the
    additive optimum stacks damages that compound. The search (priced knapsacks, then exchanges of sparsity
    between pairs of blocks) is never worse than the additive optimum under the full prediction, and finds the
    brute-force best on the 0.1 lattice on 7 of these 8 tables (it is a local search; the eighth is 8% above)."""
    import itertools

    from pruner.predictor.optimal import optimal_block_sparsity

    levels = np.round(np.arange(3, 8) * 0.1, 2)
    feasible = [np.array(c) for c in itertools.product(levels, repeat=4) if abs(sum(c) - 2.0) < 1e-9]
    found, changed = 0, 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        gains = -np.cumsum(rng.random((4, 2)), axis=1)[:, ::-1]  # at 0.3 below 0.4
        damages = np.cumsum(rng.random((4, 2)), axis=1)
        table = DamageTable(np.array([0.3, 0.4, 0.6, 0.7]), np.array([1.0]),
                            1.0 + np.concatenate([gains, damages], axis=1)[:, :, None], np.full(4, 100.0), anchor=0.5)
        additive = optimal_block_sparsity(table, 0.5, step=0.1)
        table.compounding = {"_gamma": np.array([3.0, 0.0])}  # fitted γ set directly: a strong compounding
        got = optimal_block_sparsity(table, 0.5, step=0.1)
        assert got.mean() == pytest.approx(0.5)
        predicted, best = table.predict(got).perplexity, min(table.predict(c).perplexity for c in feasible)
        assert predicted <= table.predict(additive).perplexity * (1 + 1e-12) and predicted <= best * 1.1, seed
        found += predicted == pytest.approx(best, rel=1e-9)
        changed += not np.allclose(got, additive)
    assert found == 7 and changed == 5


def test_predictor_optimal_allocator_through_the_registry(built, data_dir):
    """`predicted` is a learned allocator: learning builds/reads the damage table around S and runs the programme;
    its block sparsities have mean S and a predicted loss no higher than uniform's or OWL's. How it was learned is
    part of its runs' key."""
    from pruner.allocation import allocate
    from pruner.engine.artifacts import learn_allocation, learned_layer_sparsity

    spec, cache, loaded, _, _, stats = built
    # the allocator reads the table of the default held-out windows and grid: built here for the tiny model
    result = learn_allocation(spec.stats, "predicted", 0.6, cache_dir=cache, loaded=loaded)
    alloc = allocate("predicted", stats, 0.6, learned=learned_layer_sparsity(result, stats))
    assert alloc.overall == pytest.approx(0.6)
    from pruner.predictor.cache import cached_table

    table = cached_table(PredictorSpec(spec.stats, around=0.6), cache)  # the table around S, as learning reads
    assert result["predictor"] == PredictorSpec(spec.stats, around=0.6).key()
    best = table.predict(alloc.block_sparsity).perplexity
    assert result["predicted_perplexity"] == pytest.approx(best)
    for other in ("uniform", "owl", "atp"):
        assert best <= table.predict(allocate(other, stats, 0.6).block_sparsity).perplexity + 1e-12
    from pruner.predictor.optimal import OPTIMAL_LEARNER

    assert result["params"] == {"reach": 0.15}  # the default trust region, within which every block stays
    assert np.abs(alloc.block_sparsity - 0.6).max() <= 0.15 + 1e-9
    run_spec = PruneSpec(model=spec.stats.model, calib=spec.stats.calib, allocator="predicted", method="wanda",
                         sparsity=0.6)
    assert run_spec.identity()["learner"] == OPTIMAL_LEARNER.settings
    assert "learner" not in PruneSpec(model=spec.stats.model, calib=spec.stats.calib, allocator="owl",
                                      method="wanda", sparsity=0.6).identity()


def test_tuning_searches_the_slider_grid_for_the_lowest_prediction(built):
    from pruner.allocation import allocate
    from pruner.predictor.tuning import tune_parameters

    _, _, _, _, table, stats = built
    t = tune_parameters(table, stats, "atp", 0.5, points=6)  # δ ∈ {0, 0.01, …, 0.05}
    grid = np.linspace(0, 0.05, 6)
    predictions = []
    for d in grid:
        try:
            predictions.append(table.predict(allocate("atp", stats, 0.5, delta=d).block_sparsity).perplexity)
        except ValueError:
            predictions.append(np.inf)
    assert t["predicted"] == pytest.approx(min(predictions)) and t["params"]["delta"] == pytest.approx(
        grid[int(np.argmin(predictions))])
    assert t["tried"] == 6 and t["skipped"] == int(np.isinf(predictions).sum())
    assert t["params"]["delta"] == round(t["params"]["delta"], 9)  # 0.03, not 0.030000000000000002
    with pytest.raises(ValueError, match="nothing to tune"):
        tune_parameters(table, stats, "besa", 0.5)


@pytest.fixture(scope="module")
def tune_cache(tmp_path_factory):
    """One cache for the two `prune --tune` tests: both tune at S = 0.5 on the tiny Llama's Wanda table around it
    (4 × 32 calibration tokens), which the first builds and the second reads (each builds it when run alone)."""
    return tmp_path_factory.mktemp("tune-cache")


def test_cli_prune_tune_records_the_tuned_parameters(tiny_folder, data_dir, tune_cache):
    """`prune --tune` in a real subprocess: the damage table is built, OWL's λ and M are chosen on it, and the
    run's manifest carries them and how they were chosen."""
    import json

    from tests.test_cli import run_cli

    r = run_cli("prune", "--model", tiny_folder, "--nsamples", "4", "--seqlen", "32", "--allocator", "owl",
                "--method", "wanda", "--sparsity", "0.5", "--tune", cache=tune_cache, data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    assert "parameters tuned on the perplexity predictor (121 tried)" in r.stdout
    key = r.stdout.split()[1].rstrip(":")
    manifest = json.loads((tune_cache / "runs" / key / "manifest.json").read_text())
    assert manifest["tuning"]["params"] == manifest["spec"]["allocator_params"]
    assert manifest["tuning"]["by"] == "perplexity predictor"
    stats = StatsSpec(ModelSpec(tiny_folder), CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir))
    assert manifest["tuning"]["predictor"] == PredictorSpec(stats, around=0.5).key()  # the table around its S
    from pruner.jobs.workflows import PruneRequest

    with pytest.raises(ValueError, match="allocator 'uniform' has no parameters to tune"):
        PruneRequest(PruneSpec(model=ModelSpec(tiny_folder), calib=CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir),
                               allocator="uniform", method="wanda", sparsity=0.5), tune=True)


def test_tuning_reads_the_method_s_own_table_or_says_it_could_not(tiny_folder, data_dir, tune_cache, capsys):
    """Magnitude is tuned on a magnitude table; SparseGPT (whose weight updates no table measures) on a Wanda table,
    and the run's record and the CLI say so."""
    import json

    from pruner.jobs.workflows import Context, tuned_spec
    from tests.test_cli import cli_in_process

    calib = CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir)
    stats = StatsSpec(ModelSpec(tiny_folder), calib)
    magnitude = tuned_spec(PruneSpec(model=ModelSpec(tiny_folder), calib=calib, allocator="atp", method="magnitude",
                                     sparsity=0.5), Context(cache_dir=tune_cache))[1]
    assert magnitude["predictor"] == PredictorSpec(stats, method="magnitude", around=0.5).key()
    assert magnitude["table_method"] == "magnitude" and "caveat" not in magnitude
    r = cli_in_process(capsys, "prune", "--model", tiny_folder, "--nsamples", "4", "--seqlen", "32", "--allocator",
                       "atp", "--method", "sparsegpt", "--sparsity", "0.5", "--tune", cache=tune_cache, data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    assert "caveat: tuned on a wanda damage table: sparsegpt updates the kept weights" in r.stdout
    key = r.stdout.split()[1].rstrip(":")
    tuning = json.loads((tune_cache / "runs" / key / "manifest.json").read_text())["tuning"]
    assert tuning["predictor"] == PredictorSpec(stats, method="wanda", around=0.5).key()
    assert tuning["table_method"] == "wanda" and tuning["caveat"].startswith("tuned on a wanda damage table")


def test_removed_energy_worked_by_hand():
    """Rows (1, 2, 3, 4) and (4, 3, 2, 1): at 25% each row loses its lowest score (1² + 1² = 2), at 50% its two
    lowest (2 · (1 + 4) = 10), at 75% three (2 · 14 = 28); at 13% round(0.52) = 1 weight per row."""
    from pruner.predictor.measure import removed_energy
    from pruner.predictor.table import ENERGY_STEP

    e = removed_energy(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    assert len(e) == round(1 / ENERGY_STEP) + 1
    assert (e[0], e[13], e[25], e[50], e[75], e[100]) == (0.0, 2.0, 2.0, 10.0, 28.0, 60.0)


def test_equivalent_block_sparsity_worked_by_hand():
    """One block of two layers whose removed energy grows linearly, E_A(g) = 10g and E_B(g) = 30g, so the block
    removes 40g at a uniform g. s = (0.2, 0.6) removes 2 + 18 = 20: equivalent to g = 0.5 (the mean is 0.4);
    s = (0.6, 0.2) removes 6 + 6 = 12: g = 0.3; one shared sparsity is its own equivalent."""
    g = np.arange(101) * 0.01
    table = DamageTable(grid=np.array([0.5, 0.9]), dense_nll=np.array([1.0, 1.0]),
                        window_nll=np.array([[[1.5, 1.5], [3.0, 3.0]]]), block_numel=np.array([8]),
                        layer_energy=np.stack([10 * g, 30 * g]), layer_block=np.array([0, 0]))
    np.testing.assert_allclose(table.equivalent_block_sparsity([0.2, 0.6]), [0.5])
    np.testing.assert_allclose(table.equivalent_block_sparsity([0.6, 0.2]), [0.3])
    np.testing.assert_allclose(table.equivalent_block_sparsity([0.4, 0.4]), [0.4])
    assert table.predict_layers([0.2, 0.6]).perplexity == pytest.approx(math.exp(1.5))  # Δ(0.5) = 0.5
    with pytest.raises(ValueError, match=r"one sparsity per layer \(2\)"):
        table.equivalent_block_sparsity([0.5])


def test_table_holds_each_layers_removed_energy(built):
    """The built table's energies are those of the Wanda scores from the cached statistics, in their layer order;
    a uniform allocation is its own equivalent."""
    from pruner.allocation import allocate
    from pruner.core.scores import wanda_score
    from pruner.engine.besa import block_input_norms
    from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix
    from pruner.predictor.measure import removed_energy

    spec, cache, loaded, before, table, stats = built
    assert table.layer_energy.shape == (len(stats.layer_names), 101)
    _, blocks = find_blocks(loaded.model)
    b, name = int(stats.layer_block[5]), stats.layer_names[5]
    w = weight_matrix(prunable_layers(blocks[b])[name])
    np.testing.assert_allclose(table.layer_energy[5], removed_energy(wanda_score(w, block_input_norms(stats)[b][name])))
    uniform = allocate("uniform", stats, 0.5)
    np.testing.assert_allclose(table.equivalent_block_sparsity(uniform.layer_sparsity), 0.5, atol=1e-12)
    assert table.predict_layers(uniform.layer_sparsity).perplexity == pytest.approx(table.predict(uniform.block_sparsity).perplexity)


def test_cli_predicts_around_the_target_sparsity(tiny_folder, data_dir, tmp_path, capsys):
    """`pruner predict --around` builds the operating-point table at S and predicts from it: uniform at S is the
    reference itself, so its prediction is the table's reference perplexity exactly."""
    from pruner import cli
    from pruner.predictor.cache import cached_table

    args = ["predict", "--model", tiny_folder, "--device", "cpu", "--nsamples", "4", "--seqlen", "32",
            "--data-dir", data_dir, "--cache-dir", str(tmp_path), "--sparsity", "0.5", "--windows", "2",
            "--window-tokens", "32", "--allocator", "uniform", "--around", "--json"]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    stats = StatsSpec(ModelSpec(tiny_folder, device="cpu"), CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir))
    spec = PredictorSpec(stats, windows=2, window_tokens=32, around=0.5)
    table = cached_table(spec, tmp_path)
    assert out["predictor_key"] == spec.key() and out["around"] == 0.5 and table.anchor == 0.5
    assert out["predictions"][0]["perplexity"] == pytest.approx(table.dense_perplexity, rel=1e-12)
    assert out["reference_perplexity"] == pytest.approx(table.dense_perplexity)


def test_row_ranks_worked_by_hand_and_match_lowest_mask():
    from pruner.methods.masks import lowest_mask
    from pruner.predictor.measure import row_ranks

    scores = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.5, 0.5, 0.5, 0.1]])
    # stable ascending order: row 0 → positions 1, 2, 3, 0; row 1 → 3, 0, 1, 2
    assert row_ranks(scores).tolist() == [[3, 0, 1, 2], [1, 2, 3, 0]]
    for g in (0.0, 0.25, 0.5, 0.75):
        k = round(g * 4)
        assert torch.equal(row_ranks(scores) < k, lowest_mask(scores, g, "row"))
