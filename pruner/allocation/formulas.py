"""The closed-form allocators, one function each (pure numpy): uniform, OWL and its inverse, DLP, ATP,
Erdős–Rényi, the global threshold and AlphaPruning, and the shift of a block allocation to the parameter-weighted
mean S. See ``pruner.allocation`` for the symbols and the invariants they keep.
"""

from __future__ import annotations

import numpy as np

#: Paper defaults for LLaMA (OWL, Yin et al. 2024, Sec. 4): M = 5, λ = 0.08.
OWL_DEFAULT_M = 5.0


OWL_DEFAULT_LAMBDA = 0.08


#: DLP's default spread α (Chen et al. 2025, arXiv 2505.23807; the official code's default).
DLP_DEFAULT_ALPHA = 0.15


#: ATP's default common difference δ per block (Huang et al., ICML 2025, arXiv 2502.14770, tune it per model):
#: on SmolLM2's 30 blocks at S = 0.7 it spans 0.555 … 0.845 (allowed there: δ < 0.0207).
ATP_DEFAULT_DELTA = 0.01


#: BESA's β, the weight of the sparsity penalty ((ŝ − S)/S)² against the block's relative reconstruction error
#: (pruner.engine.besa). 50 held every SmolLM2 block's learned mean within 0.7 points of S at S = 0.7; 5 let it sag
#: 2.5–5 points below S.
BESA_DEFAULT_BETA = 50.0


#: Round-off below this is treated as zero when checking that a sparsity is ≥ 0.
_ROUNDOFF = 1e-12


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
    its count there (one bin spans 2.3% in score with the bins ``pruner.engine.stats`` uses). The parameter-weighted mean
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
