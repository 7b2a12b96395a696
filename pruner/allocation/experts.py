"""Sharing a block's sparsity among its routed experts (mixture-of-experts models): by each expert's outliers or
by its share of the routed calibration tokens, spread λₑ around the block's sparsity, block mean exact.
"""

from __future__ import annotations

import numpy as np

from pruner.allocation.formulas import (_ROUNDOFF, OWL_DEFAULT_LAMBDA, OWL_DEFAULT_M, AllocationRefused, _check_lambda,
                                        _scaled_ratios)
from pruner.allocation.registry import Allocation
from pruner.core.params import Param, check_params

#: How a block's sparsity is shared among its routed experts (``split_experts``).
EXPERT_SPLITS = {
    "uniform": "every expert of a block gets the block's allocation",
    "outliers": "experts with more outliers (their own LOD at Mₑ) are pruned less, OWL's formula within the block",
    "routing": "experts that receive fewer routed calibration tokens are pruned more",
}


EXPERT_LAMBDA = Param("expert_lam", "λₑ", float, OWL_DEFAULT_LAMBDA,
                      "spread of the expert split: a block's expert sparsities span 2λₑ around the block's",
                      low=0.0, high=0.5, high_open=True, step=0.01, slider=(0.0, 0.49))


EXPERT_M = Param("expert_m", "Mₑ", float, OWL_DEFAULT_M,
                 "outlier threshold of the 'outliers' expert split (× the block's mean score)", low=0.01,
                 high=9976.0, step=0.5, slider=(1.0, 20.0))


EXPERT_PARAMS = (EXPERT_LAMBDA, EXPERT_M)


def split_experts(layer_sparsity, layer_block, layer_expert, layer_numel, expert_values, lam: float) -> np.ndarray:
    """Share each block's routed-expert sparsity among its experts by ``expert_values`` (higher value: pruned less).

    Within block b, with v_e the value of expert e (its outlier ratio, or its share of the routed tokens) scaled
    like OWL's ratios, ṽ_e = (v_e − min v) / (max v − min v) · 2λₑ, every layer of expert e moves by
    δ_e = −(ṽ_e − v̄), where v̄ is the mean of ṽ weighted by the experts' parameters. Σ_e numel_e · δ_e = 0, so the
    block's parameter-weighted mean sparsity (and S) is unchanged; layers that are not experts keep theirs.
    Equal values (or λₑ = 0) change nothing.

    layer_sparsity, layer_block, layer_expert (−1: not an expert), layer_numel: (L,); expert_values: (B, E), NaN
    where a block has no such expert. Returns (L,). ``AllocationRefused`` when a sparsity would leave [0, 1).
    """
    s = np.asarray(layer_sparsity, dtype=np.float64).copy()
    blocks, experts = np.asarray(layer_block), np.asarray(layer_expert)
    numel = np.asarray(layer_numel, dtype=np.float64)
    values = np.asarray(expert_values, dtype=np.float64)
    lam = _check_lambda(lam)
    if not (experts >= 0).any():
        raise ValueError("this model has no routed experts to split a block's sparsity among")
    for b in np.unique(blocks[experts >= 0]):
        rows = (blocks == b) & (experts >= 0)
        ids = np.unique(experts[rows])
        v = values[b, ids]
        if not np.all(np.isfinite(v)):
            raise ValueError(f"block {b}: expert values must be finite; got {v}")
        weight = np.array([numel[rows & (experts == e)].sum() for e in ids])
        scaled = _scaled_ratios(v, lam)
        delta = -(scaled - (scaled * weight).sum() / weight.sum())
        for e, d in zip(ids, delta):
            s[rows & (experts == e)] += d
    if s.min() < -_ROUNDOFF or s.max() >= 1.0:
        raise AllocationRefused(f"λₑ={lam:g} is too wide: the expert split gives layer sparsities in "
                                f"[{s.min():.4f}, {s.max():.4f}], outside [0, 1); choose a smaller λₑ")
    return np.where(s < 0, 0.0, s)


def check_expert_split(split: str, params: dict | None) -> dict:
    """The expert split's parameters checked, defaults filled in (ValueError names the allowed values)."""
    if split not in EXPERT_SPLITS:
        raise ValueError(f"unknown expert split {split!r}; choose one of {', '.join(EXPERT_SPLITS)}")
    return check_params(f"expert split {split!r}", EXPERT_PARAMS if split != "uniform" else (), params)


def with_expert_split(allocation: Allocation, stats, split: str, **params) -> Allocation:
    """``allocation`` with each block's routed-expert sparsity shared by ``split`` (``EXPERT_SPLITS``): by each
    expert's outlier ratio at Mₑ (``stats.expert_matrix``) or its routed token share (``stats.expert_token_share``),
    spread λₑ (``split_experts``). Block sparsities and the overall mean are unchanged. 'uniform' returns it as is."""
    params = check_expert_split(split, params)
    if split == "uniform":
        return allocation
    values = (stats.expert_matrix(params["expert_m"]) if split == "outliers" else stats.expert_token_share())
    shapes = np.asarray(stats.layer_shapes, dtype=np.float64)
    layer = split_experts(allocation.layer_sparsity, stats.layer_block, stats.layer_expert, shapes[:, 0] * shapes[:, 1],
                          values, params["expert_lam"])
    return Allocation(allocation.allocator, allocation.sparsity, allocation.params, layer, allocation.block_sparsity,
                      allocation.overall, {**allocation.meta, "expert_split": {"split": split, **params}})
