"""The predictor-optimal allocation: the block sparsities with the least predicted damage at mean S (exchange steps
and a knapsack over compounding prices), and its learned-allocator entry point."""

from __future__ import annotations

import numpy as np

from pruner.predictor.cache import get_damage_table
from pruner.predictor.compounding import COMPOUNDING_PROBES, COMPOUNDING_SEED, COMPOUNDING_SPREADS
from pruner.predictor.table import (COMPOUNDING_TERMS, DEFAULT_WINDOW_TOKENS, DEFAULT_WINDOWS, OPERATING_OFFSETS,
                                    DamageTable, PredictorSpec)
from pruner.store.formats import TABLE_FORMAT

#: Resolution of the predictor-optimal allocation's block sparsities (1%, BESA's candidate step).
OPTIMAL_STEP = 0.01


def block_units(sparsity: float, n_blocks: int, step: float = OPTIMAL_STEP) -> int:
    """Σ_b u_b for mean S: S · B / step, which must be whole (ValueError names the steps that are)."""
    units = sparsity * n_blocks / step
    if abs(units - round(units)) > 1e-6:
        raise ValueError(f"S = {sparsity:g} over {n_blocks} blocks is not a whole number of {step:g} steps of block "
                         f"sparsity (S · B / step = {units:.3f}); choose S as a multiple of {step:g}")
    return int(round(units))


def optimal_block_sparsity(table: DamageTable, sparsity: float, step: float = OPTIMAL_STEP,
                           reach: float | None = None) -> np.ndarray:
    """Per-block sparsities minimising the predicted loss subject to a mean of exactly S, each s_b a multiple of
    ``step`` in the range the table measured ([0, top grid point], or from its lowest point for an operating-point
    table). The additive part Σ_b Δ_b(s_b) (window mean) is minimised exactly on that lattice by dynamic
    programming over blocks (a knapsack: the state is the number of ``step`` units spent so far). With a
    compounding fit (γ₊, γ₋ ≠ 0) the knapsack is solved again for a lattice of prices on damages and gains, the
    solution with the lowest full prediction is kept and then improved by exchanging steps between pairs of blocks
    (never worse than the additive optimum; not guaranteed optimal). Blocks must be of equal size (every supported decoder has them), so the unweighted mean is the
    parameter-weighted one; S · B / step must be a whole number of units (e.g. S in steps of 0.01). ``reach``:
    each s_b also within S ± reach (the allocator's trust region r). (B,)"""
    from pruner.allocation import check_sparsity

    S = check_sparsity(sparsity)
    numel = np.asarray(table.block_numel, dtype=np.float64)
    if not np.allclose(numel, numel[0]):
        raise ValueError("the predictor-optimal allocation needs blocks of equal size")
    B = table.n_blocks
    total = block_units(S, B, step)
    top = int(np.floor(float(table.grid[-1]) / step + 1e-9))
    if total > top * B:
        raise ValueError(f"S = {S:g} needs block sparsities above the table's top grid point {table.grid[-1]:g}")
    candidates = np.arange(top + 1) * step
    points = table.points()
    mean_delta = table.delta().mean(axis=2)  # (B, K + 1)
    cost = np.stack([np.interp(candidates, points, mean_delta[b]) for b in range(B)])  # (B, top + 1)
    cost[:, candidates < points[0] - 1e-9] = np.inf  # below what an operating-point table measured
    if reach is not None:
        cost[:, np.abs(candidates - S) > reach + 1e-9] = np.inf  # outside the trust region
    try:
        additive = _knapsack(cost, total, top) * step
    except ValueError:
        raise ValueError(f"no allocation of mean S = {S:g} exists on this table's range") from None
    gamma = table.gamma
    if not np.any(gamma > 0):
        return additive
    # With compounding the loss is no longer a sum over blocks. At the optimum the two pairwise terms act like
    # prices on the blocks' damages and gains (their derivatives: about 1 + 2γ₊·ΣΔ⁺ per unit of damage and
    # 1 + 2γ₋·ΣΔ⁻ per unit of gain), so the knapsack is solved for a lattice of such prices, the solution whose
    # full prediction is lowest is kept and then improved by exchanging single steps between blocks: never worse
    # than the additive optimum (prices 1, 1), not guaranteed optimal.
    damage, gain = np.clip(cost, 0, None), np.clip(cost, None, 0)
    best, best_ppl = additive, table.predict(additive).perplexity
    for damage_price in COMPOUNDING_DAMAGE_PRICES if gamma[0] > 0 else (1.0,):
        for gain_price in COMPOUNDING_GAIN_PRICES if gamma[1] > 0 else (1.0,):
            priced = damage * damage_price + gain * gain_price
            priced[~np.isfinite(cost)] = np.inf
            candidate = _knapsack(priced, total, top) * step
            predicted = table.predict(candidate).perplexity
            if predicted < best_ppl:
                best, best_ppl = candidate, predicted
    return _exchange_steps(table, best, step, np.isfinite(cost))


def _exchange_steps(table: DamageTable, block: np.ndarray, step: float, allowed: np.ndarray) -> np.ndarray:
    """Local search on the full prediction: move k ``step``s of sparsity from one block to another (k = 1, 2, …
    as far as both blocks' allowed lattice points reach; the mean stays S), taking the best move of each round,
    while some move lowers the predicted perplexity. ``allowed`` (B, units + 1): the lattice points each block
    may take."""
    units = np.round(block / step).astype(int)
    best = table.predict(units * step).perplexity
    width = allowed.shape[1]
    while True:
        move = None
        for give in range(len(units)):
            for take in range(len(units)):
                if take == give:
                    continue
                k = 1
                while (units[give] - k >= 0 and units[take] + k < width and allowed[give, units[give] - k]
                       and allowed[take, units[take] + k]):
                    trial = units.copy()
                    trial[give] -= k
                    trial[take] += k
                    predicted = table.predict(trial * step).perplexity
                    if predicted < best * (1 - 1e-12):
                        move, best = trial, predicted
                    k += 1
        if move is None:
            return units * step
        units = move


#: Prices tried on a unit of damage (≥ 1: damages compound) and of gain (≤ 1: gains saturate) when the
#: predictor-optimal allocation is searched on a table with a compounding fit.
COMPOUNDING_DAMAGE_PRICES = tuple(np.round(np.geomspace(1, 64, 25), 6))


COMPOUNDING_GAIN_PRICES = tuple(np.round(np.linspace(1, 0, 11), 6))


def _knapsack(cost: np.ndarray, total: int, top: int) -> np.ndarray:
    """Units per block (0 … top each, summing to ``total``) minimising Σ_b cost[b, units_b], by dynamic programming
    over blocks (the state is the units spent so far). cost (B, top + 1), inf where not allowed. (B,) int"""
    inf = np.inf
    B = cost.shape[0]
    best = np.full(total + 1, inf)
    best[0] = 0.0
    choice = np.zeros((B, total + 1), dtype=np.int64)
    for b in range(B):
        new = np.full(total + 1, inf)
        for k in range(min(top, total) + 1):
            shifted = np.full(total + 1, inf)
            shifted[k:] = best[: total + 1 - k] + cost[b, k]
            better = shifted < new
            new[better] = shifted[better]
            choice[b, better] = k
        best = new
    if not np.isfinite(best[total]):
        raise ValueError(f"no allocation of {total} units over {B} blocks exists on the table's range")
    out, t = np.zeros(B, dtype=np.int64), total
    for b in range(B - 1, -1, -1):
        out[b] = choice[b, t]
        t -= out[b]
    return out


def _learn_optimal(model, tokens, sparsity, stats, params, *, context, **_unused):
    """The learned-allocator protocol (``pruner.engine.besa.Learner``) for the predictor-optimal allocation: the damage
    table around S (built or read from the cache, with the calibration set's statistics) and the dynamic programme.
    The operating-point table ranks allocations at S far better than the dense-reference one (docs/results.md)."""
    spec = PredictorSpec(context["spec"], around=sparsity)
    table = get_damage_table(spec, context.get("cache_dir"), data_dir=context["spec"].calib.data_dir,
                             loaded=context.get("loaded"), progress=context.get("progress"),
                             should_cancel=context.get("should_cancel"))
    if stats is None:
        from pruner.engine.artifacts import get_stats

        stats = get_stats(context["spec"], context.get("cache_dir"), loaded=context.get("loaded"))
    block = optimal_block_sparsity(table, sparsity, reach=params.get("reach"))
    layer_block = np.asarray(stats.layer_block)
    p = table.predict(block)
    return {"layer_names": list(stats.layer_names), "layer_block": layer_block.tolist(),
            "layer_sparsity": [float(v) for v in block[layer_block]], "block_sparsity": block.tolist(),
            "predictor": spec.key(), "predicted_perplexity": p.perplexity}, stats


def _learner():
    from pruner.engine.besa import Learner

    return Learner(settings={"step": OPTIMAL_STEP, "table": "operating point S", "offsets": list(OPERATING_OFFSETS),
                             "compounding": {"probes": COMPOUNDING_PROBES, "seed": COMPOUNDING_SEED,
                                             "spreads": list(COMPOUNDING_SPREADS), "terms": list(COMPOUNDING_TERMS),
                                             "damage_prices": list(COMPOUNDING_DAMAGE_PRICES),
                                             "gain_prices": list(COMPOUNDING_GAIN_PRICES)},
                             "windows": DEFAULT_WINDOWS, "window_tokens": DEFAULT_WINDOW_TOKENS,
                             "format": TABLE_FORMAT}, learn=_learn_optimal)


#: The learned-allocator entry point ``pruner.allocation`` names ("pruner.predictor.optimal:OPTIMAL_LEARNER").
OPTIMAL_LEARNER = _learner()
