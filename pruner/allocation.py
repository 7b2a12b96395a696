"""Layerwise sparsity allocators: pure numpy, no torch, no model.

Symbols: S is the target (mean) sparsity, λ (``lam``) bounds how far a block may move from S, M (``m``) is OWL's
outlier threshold multiplier, r_i is block i's outlier ratio (LOD entry).

Invariants every allocator keeps: every sparsity is in [0, 1), and the parameter-weighted mean sparsity over all
prunable layers equals S (exactly, up to float round-off; a block formula whose blocks differ in size, as in
mixture-of-experts models with dense first blocks, is shifted to that mean by ``to_parameter_mean``). Inputs that cannot honour them raise ``ValueError`` naming the allowed range; nothing is
clamped. Where the inputs are well-formed but the allocator cannot reach S with these parameters on this model
(λ too wide, δ too steep, a global threshold that empties a layer) the error is the subclass ``AllocationRefused``,
so that a caller can tell "choose other parameters" from malformed input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from pruner.params import Param, check_params

#: Paper defaults for LLaMA (OWL, Yin et al. 2024, Sec. 4): M = 5, λ = 0.08.
OWL_DEFAULT_M = 5.0
OWL_DEFAULT_LAMBDA = 0.08
#: DLP's default spread α (Chen et al. 2025, arXiv 2505.23807; the official code's default).
DLP_DEFAULT_ALPHA = 0.15
#: ATP's default common difference δ per block (Huang et al., ICML 2025, arXiv 2502.14770, tune it per model):
#: on SmolLM2's 30 blocks at S = 0.7 it spans 0.555 … 0.845 (allowed there: δ < 0.0207).
ATP_DEFAULT_DELTA = 0.01
#: BESA's β, the weight of the sparsity penalty ((ŝ − S)/S)² against the block's relative reconstruction error
#: (pruner.besa). 50 held every SmolLM2 block's learned mean within 0.7 points of S at S = 0.7; 5 let it sag
#: 2.5–5 points below S.
BESA_DEFAULT_BETA = 50.0
#: Round-off below this is treated as zero when checking that a sparsity is ≥ 0.
_ROUNDOFF = 1e-12

#: What an allocator reads (``Allocator.needs``), from cheapest to dearest. Pruning computes only what the chosen
#: allocator needs: the layout is read off the model; the weights' spectra need no calibration data; the dense
#: model's statistics are a full calibration pass over every block *before* any block is pruned, because these
#: allocators normalise over all blocks at once (OWL's min–max scaling of the LOD, the global threshold's one
#: cut across all layers), so block 0's sparsity depends on the last block's scores.
NEEDS_LAYOUT = "layout"  # layer names, blocks and shapes
NEEDS_WEIGHTS = "weights"  # the layout plus per-layer quantities of the dense weights alone (PL_Alpha_Hill)
NEEDS_STATISTICS = "statistics"  # the dense model's calibration statistics (input norms, Wanda-score summaries)
NEEDS = (NEEDS_LAYOUT, NEEDS_WEIGHTS, NEEDS_STATISTICS)


class AllocationRefused(ValueError):
    """Well-formed inputs, but no allocation with these parameters keeps every sparsity in [0, 1) at this S on this
    model; the message names the allowed range where there is one."""


def check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not (0.0 < s < 1.0):
        raise ValueError(f"target sparsity S must be in (0, 1); got {sparsity!r}")
    return s


def _check_lambda(lam: float) -> float:
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"λ (lam) must be ≥ 0; got {lam!r}")
    return lam


def uniform(n_blocks: int, sparsity: float) -> np.ndarray:
    """Every block gets S. (n_blocks,)"""
    if int(n_blocks) < 1:
        raise ValueError(f"n_blocks must be ≥ 1; got {n_blocks!r}")
    return np.full(int(n_blocks), check_sparsity(sparsity))


def _scaled_ratios(outlier_ratios, lam: float) -> np.ndarray:
    """r̃ = (r − min r) / (max r − min r) · 2λ, in [0, 2λ]; all zeros when every ratio is equal."""
    r = np.asarray(outlier_ratios, dtype=np.float64)
    if r.ndim != 1 or r.size < 1 or not np.all(np.isfinite(r)):
        raise ValueError("outlier ratios must be a non-empty 1-D array of finite numbers")
    spread = r.max() - r.min()
    if spread == 0:
        return np.zeros_like(r)
    return (r - r.min()) / spread * (2 * lam)


def _owl_family(outlier_ratios, sparsity: float, lam: float, direction: int, label: str,
                symbol: str = "λ") -> np.ndarray:
    """sparsity_i = S − direction · (r̃_i − mean r̃); direction +1 is OWL (and DLP), −1 OWL's inverse."""
    S = check_sparsity(sparsity)
    lam = _check_lambda(lam)
    r_tilde = _scaled_ratios(outlier_ratios, lam)
    density = direction * (r_tilde - r_tilde.mean()) + (1.0 - S)
    out = 1.0 - density
    if out.min() < -_ROUNDOFF or out.max() >= 1.0:
        lam_max = owl_lambda_max(outlier_ratios, S, inverse=direction < 0)
        raise AllocationRefused(
            f"{symbol}={lam:g} is too wide for S={S:g}: {label} would give block sparsities in "
            f"[{out.min():.4f}, {out.max():.4f}], outside [0, 1); allowed here: 0 ≤ {symbol} < {lam_max:.4f}"
        )
    return np.where(out < 0, 0.0, out)  # only round-off (> −1e-12) reaches here


def owl(outlier_ratios, sparsity: float, lam: float) -> np.ndarray:
    """OWL's per-block sparsities (Yin et al. 2024, Eq. in Sec. 3.3, as in the official code).

    r̃_i = (r_i − min r) / (max r − min r) · 2λ;  density_i = r̃_i − mean(r̃) + (1 − S);  s_i = 1 − density_i.
    Blocks with more outliers keep more weights. The unweighted mean of s_i is S and max s − min s = 2λ, but the
    range is [S − 2λ(1 − m̄), S + 2λm̄] with m̄ = mean of (r − min r)/(max r − min r): it is the paper's band
    [S − λ, S + λ] only when m̄ = 1/2, and a skewed LOD pushes the outlier-rich blocks below S − λ.
    Equal ratios give the uniform allocation. (n_blocks,) → (n_blocks,)
    """
    return _owl_family(outlier_ratios, sparsity, lam, +1, "OWL")


def owl_inverse(outlier_ratios, sparsity: float, lam: float) -> np.ndarray:
    """The OWL paper's ablation: blocks with more outliers are pruned *more*: s_i = S + (r̃_i − mean r̃)."""
    return _owl_family(outlier_ratios, sparsity, lam, -1, "OWL-inverse")


def dlp_importance(block_mean_score) -> np.ndarray:
    """DLP's block importance i_b = 1 − Ā_b / Σ_b Ā_b from each block's mean Wanda score Ā_b (mean of
    |W_ij|·‖X_j‖₂ over the block's prunable weights, on the dense model's block inputs). (B,) → (B,)"""
    score = np.asarray(block_mean_score, dtype=np.float64)
    if score.ndim != 1 or score.size < 1 or not np.all(np.isfinite(score)) or np.any(score < 0) or score.sum() <= 0:
        raise ValueError("DLP needs each block's mean Wanda score: a non-empty 1-D array of finite scores ≥ 0, "
                         "not all zero")
    return 1.0 - score / score.sum()


def dlp(block_mean_score, sparsity: float, alpha: float = DLP_DEFAULT_ALPHA) -> np.ndarray:
    """DLP's per-block sparsities (Chen et al. 2025, "DLP: Dynamic Layerwise Pruning in Large Language Models",
    as its official ``get_dlp_ratios``).

    i_b = 1 − Ā_b / Σ Ā;  ĩ_b = (i_b − min i) / (max i − min i) · 2α;  density_b = ĩ_b − mean ĩ + (1 − S);
    s_b = 1 − density_b. OWL's formula with the importance in place of the outlier ratio and α in place of λ:
    blocks whose weights score lower on average (more important by DLP's measure) keep more weights; the
    unweighted mean is S and max s − min s = 2α. (B,) → (B,)
    """
    return _owl_family(dlp_importance(block_mean_score), sparsity, alpha, +1, "DLP", "α")


def atp_delta_max(block_numel, sparsity: float) -> float:
    """Supremum of ATP's δ keeping every s_b = s_0 + bδ in [0, 1): with b̄ = Σ n_b b / Σ n_b the parameter-weighted
    mean index, s_0 = S − δb̄ ≥ 0 and s_{L−1} = S + δ(L − 1 − b̄) < 1, so δ ≤ S / b̄ and δ < (1 − S)/(L − 1 − b̄)
    (``inf`` for one block)."""
    S = check_sparsity(sparsity)
    n = np.asarray(block_numel, dtype=np.float64)
    index = np.arange(len(n), dtype=np.float64)
    b_bar = float((n * index).sum() / n.sum())
    bounds = [S / b_bar if b_bar > 0 else np.inf, (1 - S) / (len(n) - 1 - b_bar) if len(n) - 1 > b_bar else np.inf]
    return float(min(bounds))


def atp(block_numel, sparsity: float, delta: float = ATP_DEFAULT_DELTA) -> np.ndarray:
    """ATP's per-block sparsities (Huang et al., ICML 2025, "Determining Layer-wise Sparsity for Large Language
    Models Through a Theoretical Perspective"): an increasing arithmetic progression over depth,

    s_b = s_0 + b·δ (b = 0 … L − 1), with s_0 = S − δ · Σ n_b b / Σ n_b so that the parameter-weighted mean
    is exactly S (n_b: block b's prunable weights). δ = 0 is uniform; a δ that would leave [0, 1) raises
    ``ValueError`` naming the allowed range (``atp_delta_max``). (B,) → (B,)
    """
    S = check_sparsity(sparsity)
    n = np.asarray(block_numel, dtype=np.float64)
    if n.ndim != 1 or n.size < 1 or np.any(n <= 0):
        raise ValueError("ATP needs every block's number of prunable weights (a non-empty array of counts > 0)")
    delta = float(delta)
    if not np.isfinite(delta) or delta < 0:
        raise ValueError(f"δ (delta) must be ≥ 0 (sparsity increasing with depth); got {delta!r}")
    index = np.arange(len(n), dtype=np.float64)
    s = S - delta * float((n * index).sum() / n.sum()) + delta * index
    if s.min() < -_ROUNDOFF or s.max() >= 1:
        raise AllocationRefused(f"δ={delta:g} is too steep for S={S:g} over {len(n)} blocks: ATP would give "
                                f"block sparsities in [{s.min():.4f}, {s.max():.4f}], outside [0, 1); allowed here: "
                                f"0 ≤ δ < {atp_delta_max(n, S):.4f}")
    return np.where(s < 0, 0.0, s)  # only round-off (> −1e-12) reaches here


def owl_lambda_max(outlier_ratios, sparsity: float, inverse: bool = False) -> float:
    """Supremum of λ for which OWL (or its inverse) keeps every block sparsity in [0, 1).

    With m̄ = mean of (r − min r)/(max r − min r): OWL's sparsities span [S − 2λ(1 − m̄), S + 2λm̄], so it needs
    λ ≤ S / (2(1 − m̄)) and λ < (1 − S) / (2m̄); the inverse swaps m̄ and 1 − m̄. ``inf`` when all ratios are equal.
    """
    S = check_sparsity(sparsity)
    unit = _scaled_ratios(outlier_ratios, 0.5)  # (r − min)/(max − min), in [0, 1]
    if not unit.any():
        return float("inf")
    m_bar = float(unit.mean())
    up, down = (1 - m_bar, m_bar) if inverse else (m_bar, 1 - m_bar)  # per unit of 2λ
    bounds = [(1 - S) / (2 * up) if up > 0 else np.inf, S / (2 * down) if down > 0 else np.inf]
    return float(min(bounds))


def er(layer_shapes, sparsity: float) -> np.ndarray:
    """Erdős–Rényi allocation per layer (Mocanu et al. 2018; Evci et al. 2020).

    density_l = ε · (n_in + n_out) / (n_in · n_out), with ε chosen so that the parameter-weighted density is 1 − S.
    Layers whose density would exceed 1 are kept dense and ε is re-solved for the rest.
    layer_shapes: (L, 2) of (out_features, in_features) → (L,) sparsities.
    """
    S = check_sparsity(sparsity)
    shapes = np.asarray(layer_shapes, dtype=np.float64)
    if shapes.ndim != 2 or shapes.shape[1] != 2 or shapes.shape[0] < 1 or np.any(shapes < 1):
        raise ValueError("layer_shapes must be an (L, 2) array of positive (out_features, in_features)")
    n_out, n_in = shapes[:, 0], shapes[:, 1]
    numel = n_out * n_in
    raw = (n_in + n_out) / numel
    dense = np.zeros(len(numel), dtype=bool)
    while True:
        budget = (1 - S) * numel.sum() - numel[dense].sum()  # weights to keep in the non-dense layers
        eps = budget / (raw[~dense] * numel[~dense]).sum()
        density = np.where(dense, 1.0, eps * raw)
        newly = (density > 1.0) & ~dense
        if not newly.any():
            return 1.0 - density
        dense |= newly


def global_threshold(score_hist, sparsity: float) -> np.ndarray:
    """One Wanda-score threshold across all prunable layers; returns each layer's resulting sparsity.

    ``score_hist`` is (L, H): per layer, counts of scores in shared ascending bins. The threshold falls in the bin
    where the cumulative count reaches S · N; inside that bin, weights are pruned from every layer in proportion to
    its count there (one bin spans 2.3% in score with the bins ``pruner.stats`` uses). The parameter-weighted mean
    of the result is exactly S. A threshold that would empty a whole layer raises ``ValueError``. (L, H) → (L,)
    """
    S = check_sparsity(sparsity)
    hist = np.asarray(score_hist, dtype=np.float64)
    if hist.ndim != 2 or np.any(hist < 0):
        raise ValueError("score_hist must be an (L, H) array of non-negative counts")
    numel = hist.sum(axis=1)
    if np.any(numel == 0):
        raise ValueError("every layer needs at least one score in score_hist")
    target = S * numel.sum()
    cumulative = np.cumsum(hist.sum(axis=0))
    b = int(np.searchsorted(cumulative, target, side="left"))  # first bin where the cumulative count ≥ target
    before = cumulative[b - 1] if b > 0 else 0.0
    in_bin = cumulative[b] - before
    share = (target - before) / in_bin
    pruned = hist[:, :b].sum(axis=1) + share * hist[:, b]
    out = pruned / numel
    full = np.flatnonzero(out >= 1.0)
    if full.size:
        raise AllocationRefused(
            f"S={S:g} is too high for a global threshold here: it would prune every weight of layer(s) "
            f"{full.tolist()}; lower S"
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Registry: a uniform interface over the formulas above, fed by cached statistics.


#: AlphaPruning's ε as a fraction of S: block sparsities span [S − ε, S + ε] before the mean is restored.
ALPHA_EPSILON_FRACTION = 0.3


def alpha_pruning(block_alpha, block_numel, sparsity: float,
                  epsilon_fraction: float = ALPHA_EPSILON_FRACTION) -> np.ndarray:
    """AlphaPruning (Lu et al., NeurIPS 2024) per block: the block's mean PL_Alpha_Hill α_b mapped linearly onto
    [S − ε, S + ε] (higher α, a lighter tail, is pruned more), then shifted so the parameter-weighted mean is S.

    ε = ``epsilon_fraction`` · S (default ALPHA_EPSILON_FRACTION), but at most half the distance from S to 1, so that S + ε stays below 1;
    a result outside [0, 1) after the shift is an error, not clipped.
    """
    a = np.asarray(block_alpha, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"PL_Alpha_Hill is undefined for block(s) {np.flatnonzero(~np.isfinite(a)).tolist()} "
                         f"(weights with fewer than two nonzero singular values); AlphaPruning cannot rank them")
    w = np.asarray(block_numel, dtype=np.float64)
    S = check_sparsity(sparsity)
    if not (0 < epsilon_fraction <= 1):
        raise ValueError(f"AlphaPruning's ε fraction must be in (0, 1]; got {epsilon_fraction!r}")
    eps = min(epsilon_fraction * S, (1 - S) / 2)
    span = a.max() - a.min()
    unit = (a - a.min()) / span if span > 0 else np.full_like(a, 0.5)
    s = S - eps + 2 * eps * unit
    s = s + (S - (s * w).sum() / w.sum())
    if s.min() < 0 or s.max() >= 1:
        raise AllocationRefused(f"AlphaPruning's sparsities leave [0, 1) at S = {S:g} "
                                f"(range {s.min():.3f}…{s.max():.3f})")
    return s


def _block_numel(x) -> np.ndarray:
    shapes = np.asarray(x.layer_shapes, dtype=np.float64)
    return np.bincount(np.asarray(x.layer_block), weights=shapes[:, 0] * shapes[:, 1], minlength=x.n_blocks)


def _block_mean(values, layer_block, n_blocks) -> np.ndarray:
    layer_block = np.asarray(layer_block)
    return np.bincount(layer_block, weights=values, minlength=n_blocks) / np.bincount(layer_block, minlength=n_blocks)


class AllocationInputs(Protocol):
    """What allocators read (``pruner.stats.Stats`` provides it)."""

    layer_block: np.ndarray  # (L,) block index of each layer
    layer_shapes: np.ndarray  # (L, 2) (out_features, in_features)
    score_hist: np.ndarray  # (L, H) Wanda-score histogram
    layer_alpha: np.ndarray  # (L,) PL_Alpha_Hill per layer
    block_mean_score: np.ndarray  # (B,) mean Wanda score per block (statistics only)

    @property
    def n_blocks(self) -> int: ...

    def lod(self, m: float) -> np.ndarray: ...


#: The allocators' declared parameters (``pruner.params``); a sparsity interval [0, 1) spans at most 2λ < 1.
LAMBDA = Param("lam", "λ", float, OWL_DEFAULT_LAMBDA, "OWL's spread: block sparsities span 2λ around S",
               low=0.0, high=0.5, high_open=True, step=0.01, slider=(0.0, 0.49))
#: M's range is that of the statistics' exact grid (``pruner.stats.M_GRID``: 0.01 … ≈9976).
OWL_M = Param("m", "M", float, OWL_DEFAULT_M, "OWL's outlier threshold: a score is an outlier above M × the block mean",
              low=0.01, high=9976.0, step=0.5, slider=(1.0, 20.0))
BETA = Param("beta", "β", float, BESA_DEFAULT_BETA, "BESA's weight of the sparsity penalty ((ŝ − S)/S)²",
             low=0.0, low_open=True, step=5.0)
ALPHA_EPSILON = Param("epsilon", "ε", float, ALPHA_EPSILON_FRACTION,
                      "AlphaPruning's spread as a fraction of S: block sparsities span S ± ε·S before the mean is "
                      "restored (ε·S is at most (1 − S)/2)", low=0.0, high=1.0, low_open=True, step=0.05,
                      slider=(0.05, 1.0))
DLP_ALPHA = Param("alpha", "α", float, DLP_DEFAULT_ALPHA, "DLP's spread: block sparsities span 2α around S",
                  low=0.0, high=0.5, high_open=True, step=0.01, slider=(0.0, 0.49))
ATP_DELTA = Param("delta", "δ", float, ATP_DEFAULT_DELTA,
                  "ATP's common difference: each block is pruned δ more than the one before it",
                  low=0.0, high=1.0, high_open=True, step=0.001, slider=(0.0, 0.05))

#: The predictor-optimal allocation's trust region: the programme may move a block at most this far from S. Where
#: the table's additivity was checked (docs/results.md: OWL, DLP, ATP at their usual settings, within ±0.15 of S) its
#: ranking held; unbounded on the table's whole grid, the programme piles up large moves whose predicted gains do
#: not add (SmolLM2 at 70%: predicted 25.5, measured 514, against ATP's 358).
OPTIMAL_REACH = Param("reach", "r", float, 0.15,
                      "predictor-optimal: the largest |s_b − S| the dynamic programme may give a block",
                      low=0.0, high=1.0, low_open=True, step=0.01, slider=(0.01, 0.3))

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


@dataclass(frozen=True)
class Allocator:
    """A registry entry. ``compute(inputs, S, **params)`` returns the (L,) per-layer sparsities from what
    ``needs`` names; ``params`` declares its parameters. A learned allocator has no formula: ``learner`` names the
    function (``"module:function"``, imported only when used) that learns its per-layer sparsities through the
    model, run as a request of its own (``pruner.workflows.LearnRequest``)."""

    name: str
    label: str
    granularity: str  # "block" (one sparsity per block) or "layer"
    compute: Callable[..., np.ndarray]
    description: str
    params: tuple[Param, ...] = ()
    #: What ``compute`` reads: one of ``NEEDS`` (a learned allocator: what its learning reads).
    needs: str = NEEDS_STATISTICS
    learner: str | None = None

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise ValueError(f"allocator {self.name!r}: needs must be one of {', '.join(NEEDS)}; got {self.needs!r}")

    @property
    def learned(self) -> bool:
        return self.learner is not None

    def check(self, params: dict | None) -> dict:
        """Its parameters checked, defaults filled in (ValueError names the allowed range)."""
        return check_params(f"allocator {self.name!r}", self.params, params)

    def pick(self, values: dict) -> dict:
        """The entries of ``values`` that are this allocator's parameters (for a page that shows several)."""
        return {p.name: values[p.name] for p in self.params if p.name in values}

    def setting_label(self, parameters: str | None) -> str:
        """Its label with a parameter text: "OWL (λ=0.08, M=5)"; a label that already ends in a parenthesis takes
        the parameters inside it ("BESA (learned, β=50)", not "BESA (learned) (β=50)")."""
        if not parameters:
            return self.label
        if self.label.endswith(")"):
            return f"{self.label[:-1]}, {parameters})"
        return f"{self.label} ({parameters})"


def _learned_elsewhere(inputs, S, **params):
    raise ValueError("this allocator's sparsities are learned from calibration data through the model, not computed "
                     "from the statistics: learn them with pruner.api.learn_allocation (CLI: `allocate "
                     "--allocator NAME`) and pass them as learned=")


def to_parameter_mean(block_sparsity, block_numel, sparsity: float) -> np.ndarray:
    """Block sparsities shifted by one constant so that their parameter-weighted mean is S.

    The block formulas (OWL, DLP, ...) make the *unweighted* mean of the blocks S, which is the parameter-weighted
    mean when every block has the same size. Mixture-of-experts models whose first blocks are dense (DeepSeek-V3,
    GLM-4.5, Ernie 4.5: an expert block holds many times a dense one's weights) are not so: there the whole curve
    moves by c = S − Σ numel_b s_b / Σ numel_b, which keeps its shape (every difference between blocks) and makes the
    pruned share exactly S. Equal sizes are returned unchanged. ``AllocationRefused`` when the shift leaves [0, 1).
    """
    s = np.asarray(block_sparsity, dtype=np.float64)
    w = np.asarray(block_numel, dtype=np.float64)
    if np.all(w == w[0]):
        return s
    shifted = s + (check_sparsity(sparsity) - (s * w).sum() / w.sum())
    if shifted.min() < -_ROUNDOFF or shifted.max() >= 1.0:
        raise AllocationRefused(f"blocks differ in size, and moving this allocation to mean S={sparsity:g} over the "
                                f"parameters gives block sparsities in [{shifted.min():.4f}, {shifted.max():.4f}], "
                                "outside [0, 1); choose a narrower spread")
    return np.where(shifted < 0, 0.0, shifted)


def _per_block(fn):
    def compute(inputs: AllocationInputs, S, **params):
        block = to_parameter_mean(fn(inputs, S, **params), _block_numel(inputs), S)
        return block[np.asarray(inputs.layer_block)]

    return compute


def _alpha(x, S, epsilon):
    return alpha_pruning(_block_mean(x.layer_alpha, x.layer_block, x.n_blocks), _block_numel(x), S, epsilon)


ALLOCATORS: dict[str, Allocator] = {}


def register(allocator: Allocator) -> Allocator:
    """Add an allocator to the registry (its CLI flags, page controls and validation follow from it)."""
    if allocator.name in ALLOCATORS:
        raise ValueError(f"an allocator named {allocator.name!r} is already registered")
    ALLOCATORS[allocator.name] = allocator
    return allocator


for _a in (
    Allocator("uniform", "Uniform", "block", _per_block(lambda x, S: uniform(x.n_blocks, S)),
              "the same sparsity S for every block", needs=NEEDS_LAYOUT),
    Allocator("owl", "OWL", "block", _per_block(lambda x, S, lam, m: owl(x.lod(m), S, lam)),
              "blocks with more outliers (share of scores above M × the block mean) keep more weights; S ± λ",
              params=(LAMBDA, OWL_M)),
    Allocator("owl_inverse", "OWL-inverse", "block", _per_block(lambda x, S, lam, m: owl_inverse(x.lod(m), S, lam)),
              "ablation: blocks with more outliers are pruned more; S ± λ", params=(LAMBDA, OWL_M)),
    Allocator("er", "Erdős–Rényi", "layer", lambda x, S: er(x.layer_shapes, S),
              "per-layer density ∝ (n_in + n_out) / (n_in · n_out)", needs=NEEDS_LAYOUT),
    Allocator("global", "Global", "layer", lambda x, S: global_threshold(x.score_hist, S),
              "one Wanda-score threshold across all layers"),
    Allocator("alpha", "AlphaPruning", "block", _per_block(_alpha),
              "blocks whose weight spectra have lighter tails (higher PL_Alpha_Hill) are pruned more",
              params=(ALPHA_EPSILON,), needs=NEEDS_WEIGHTS),
    Allocator("dlp", "DLP", "block", _per_block(lambda x, S, alpha: dlp(x.block_mean_score, S, alpha)),
              "blocks with a lower mean Wanda score (more important by DLP's measure) keep more weights; S ± α",
              params=(DLP_ALPHA,)),
    Allocator("atp", "ATP", "block", _per_block(lambda x, S, delta: atp(_block_numel(x), S, delta)),
              "sparsity rises with depth in equal steps δ (an arithmetic progression) around mean S",
              params=(ATP_DELTA,), needs=NEEDS_LAYOUT),
    Allocator("besa", "BESA (learned)", "layer", _learned_elsewhere,
              "per-layer sparsities learned per block to minimise its reconstruction error at mean S",
              params=(BETA,), learner="pruner.besa:BESA_LEARNER"),
    Allocator("predicted", "Predictor-optimal", "block", _learned_elsewhere,
              "per-block sparsities minimising the perplexity predictor's loss at mean S (dynamic programme over "
              "its damage table), each within ±r of S", params=(OPTIMAL_REACH,),
              learner="pruner.predictor:OPTIMAL_LEARNER"),
):
    register(_a)


def formula_allocators() -> tuple[str, ...]:
    """Allocators computed from their inputs alone (instant); the others are learned through the model."""
    return tuple(name for name, a in ALLOCATORS.items() if not a.learned)


@dataclass(frozen=True)
class Allocation:
    """An allocator's result: per-layer sparsities plus their parameter-weighted mean per block."""

    allocator: str
    sparsity: float
    params: dict
    layer_sparsity: np.ndarray  # (L,)
    block_sparsity: np.ndarray  # (B,)
    overall: float  # parameter-weighted mean over all layers
    meta: dict = field(default_factory=dict)

    def to_dict(self, layer_names: list[str] | None = None, layer_block=None) -> dict:
        out = {
            "allocator": self.allocator,
            "target_sparsity": self.sparsity,
            "params": self.params,
            "overall_sparsity": self.overall,
            "block_sparsity": [float(v) for v in self.block_sparsity],
        }
        if layer_names is not None and layer_block is not None:
            out["layer_sparsity"] = [
                {"block": int(b), "layer": n, "sparsity": float(s)}
                for n, b, s in zip(layer_names, layer_block, self.layer_sparsity)
            ]
        else:
            out["layer_sparsity"] = [float(v) for v in self.layer_sparsity]
        if "expert_split" in self.meta:
            out["expert_split"] = self.meta["expert_split"]
        return out


def _check_learned(learned, n_layers: int) -> np.ndarray:
    s = np.asarray(learned, dtype=np.float64)
    if s.shape != (n_layers,):
        raise ValueError(f"learned sparsities must be one per prunable layer ({n_layers}); got shape {s.shape}")
    if not np.all(np.isfinite(s)) or s.min() < -_ROUNDOFF or s.max() >= 1:
        raise ValueError(f"learned sparsities must lie in [0, 1); got {s.min():.4f}…{s.max():.4f}")
    return s


def allocate(name: str, inputs: AllocationInputs, sparsity: float, *, learned: np.ndarray | None = None,
             **params) -> Allocation:
    """Run allocator ``name`` on its inputs with its parameters (keywords; missing ones take their declared
    defaults, e.g. OWL's λ = 0.08 and M = 5; undeclared ones are an error).

    A learned allocator (BESA) takes its per-layer sparsities as ``learned`` ((L,), learned at this S with these
    parameters), which this function checks and summarises like any other allocation.
    """
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; choose one of {', '.join(ALLOCATORS)}")
    S = check_sparsity(sparsity)
    a = ALLOCATORS[name]
    params = a.check(params)
    if a.learned and learned is not None:
        layer = _check_learned(learned, len(inputs.layer_shapes))
    else:
        layer = np.asarray(a.compute(inputs, S, **params), dtype=np.float64)
    shapes = np.asarray(inputs.layer_shapes, dtype=np.float64)
    numel = shapes[:, 0] * shapes[:, 1]
    blocks = np.asarray(inputs.layer_block)
    kept_weighted = np.bincount(blocks, weights=layer * numel, minlength=inputs.n_blocks)
    block = kept_weighted / np.bincount(blocks, weights=numel, minlength=inputs.n_blocks)
    return Allocation(name, S, params, layer, block, float((layer * numel).sum() / numel.sum()))


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
