"""Outlier statistics of a dense model: Wanda's input norms and OWL's Layerwise Outlier Distribution.

Definitions (OWL, Yin et al. 2024, Sec. 3; Wanda, Sun et al. 2024, Eq. 1):

* For a linear layer with weight W (out × in) and calibration inputs X (tokens × in), the Wanda score is
  ``A_ij = |W_ij| · ‖X_j‖₂``, where ‖X_j‖₂ is the L2 norm of input feature j over all calibration tokens.
* For a transformer block, concatenate the scores of all its linear layers; Ā is their mean. The block's
  outlier ratio (its LOD entry) at threshold M is the share of scores with ``A_ij > M · Ā`` (strictly greater,
  as in the official OWL code).

To answer ``lod(M)`` for any M without touching the model again, the collector stores, for every layer, how many
of its scores exceed ``m · Ā_block`` for every m on ``M_GRID``. At grid points (every multiple of 0.01 up to 50,
then 100 log-spaced points per decade up to ~10⁴) the answer is exact; between grid points it is linearly
interpolated. The same table gives the distribution of A/Ā for plots. Also stored per layer: the input-norm
vector and a histogram of raw scores on a fixed log grid (for the global-threshold allocator).
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pruner.core.scores import accumulate_sumsq, wanda_score
from pruner.engine.layout import layer_alpha
from pruner.model.anatomy import expert_index, expert_kind, is_expert_unit, layer_kinds, weight_matrix
from pruner.store.formats import (NPZ_SHA256, SPEC_KEY, STATS_FORMAT_VERSION, CorruptArtifact, file_sha256,
                                  verification_problem)

#: M values at which outlier counts are exact: 0.01, 0.02, ..., 50 (fine), then 100 per decade up to ~9976.
M_FINE_STEP = 0.01
M_FINE_MAX = 50.0
M_COARSE_PER_DECADE = 100
M_COARSE_DECADES = 2.3
M_GRID = np.concatenate(
    [
        np.arange(1, round(M_FINE_MAX / M_FINE_STEP) + 1) / round(1 / M_FINE_STEP),
        M_FINE_MAX * 10.0 ** (np.arange(1, round(M_COARSE_DECADES * M_COARSE_PER_DECADE) + 1) / M_COARSE_PER_DECADE),
    ]
)

#: Raw-score histogram: bins of 0.01 in log10(A) from 1e-12 to 1e8, plus an underflow bin (holding A = 0 too)
#: and an overflow bin. One bin spans 2.3% in score.
SCORE_LOG10_MIN, SCORE_LOG10_MAX, SCORE_LOG10_STEP = -12.0, 8.0, 0.01
SCORE_EDGES = 10.0 ** np.linspace(
    SCORE_LOG10_MIN, SCORE_LOG10_MAX, round((SCORE_LOG10_MAX - SCORE_LOG10_MIN) / SCORE_LOG10_STEP) + 1
)

#: Bin edges for plotting the distribution of A/Ā: the grid points nearest to 20 log-spaced values per decade.
#: (The distribution is read off the exact count table, so it needs no histogram of its own.)
RATIO_PLOT_PER_DECADE = 20

#: Relative tolerance for treating a requested M as a grid point (absorbs decimal round-off such as 0.1 + 0.2).
_GRID_MATCH_RTOL = 1e-9


def counts_above(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """For each threshold t (ascending), how many ``values`` are strictly greater than t. (len(thresholds),) int64."""
    # bucketize(right=False) gives i with thresholds[i-1] < v <= thresholds[i], i.e. i = #{t : t < v}.
    index = torch.bucketize(values, thresholds, right=False)
    per_bucket = torch.bincount(index, minlength=len(thresholds) + 1)
    # v > thresholds[k]  <=>  index >= k + 1
    return per_bucket.flip(0).cumsum(0).flip(0)[1:]


def histogram(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Counts in (−∞, e0], (e0, e1], ..., (e_last, ∞): len(edges) + 1 bins, int64."""
    return torch.bincount(torch.bucketize(values, edges, right=False), minlength=len(edges) + 1)


class CorruptStatistics(CorruptArtifact):
    """Cached statistics that are not what they claim to be (truncated, altered, or another spec's)."""

    def __init__(self, folder: Path, problem: str):
        super().__init__("statistics", folder, problem)


@dataclass
class LayerSummary:
    """What the collector keeps of one layer."""

    input_norm: np.ndarray  # (in,) float64, ‖X_j‖₂
    ratio_counts_above: np.ndarray  # (len(M_GRID),) int64: #{A_ij > m·Ā_block}
    score_hist: np.ndarray  # (len(SCORE_EDGES)+1,) int64


def summarize_block(weights: list[torch.Tensor], input_norms: list[torch.Tensor]) -> tuple[float, list[LayerSummary]]:
    """Scores of one block's layers → (block mean score Ā, per-layer summaries).

    ``weights[l]`` is (out, in) and ``input_norms[l]`` is (in,). Ā is the mean over all layers' scores
    concatenated (OWL's definition: larger layers weigh more).
    """
    scores = [wanda_score(w, n) for w, n in zip(weights, input_norms)]  # float64
    total = sum(float(s.sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    mean = total / count
    device = scores[0].device
    m_grid = torch.as_tensor(M_GRID, dtype=torch.float64, device=device)
    score_edges = torch.as_tensor(SCORE_EDGES, dtype=torch.float64, device=device)
    out = []
    for s, n in zip(scores, input_norms):
        flat = s.flatten().double()
        ratio = flat / mean if mean > 0 else torch.zeros_like(flat)
        out.append(
            LayerSummary(
                input_norm=n.double().cpu().numpy(),
                ratio_counts_above=counts_above(ratio, m_grid).cpu().numpy(),
                score_hist=histogram(flat, score_edges).cpu().numpy(),
            )
        )
    return mean, out


class _InputNormObserver:
    """Accumulates Σ_tokens x_j² (float64) of every layer's input during the block's forward passes, and how many
    tokens each layer saw (all of them for a dense layer; the routed ones for an expert's matrices)."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.sumsq: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.layers = layers

    def hooks(self):
        handles = []
        for name, layer in self.layers.items():

            def hook(module, args, output, name=name):
                self.sumsq[name] = accumulate_sumsq(self.sumsq.get(name), args[0])
                self.tokens[name] = self.tokens.get(name, 0) + args[0].numel() // args[0].shape[-1]

            handles.append(layer.register_forward_hook(hook))
        return handles

    def norms(self) -> dict[str, torch.Tensor]:
        return {name: acc.sqrt() for name, acc in self.sumsq.items()}


@dataclass
class Stats:
    """Outlier statistics of one dense model on one calibration set (all numpy, no model needed).

    Layers are numbered 0..L−1 in block order; ``layer_block[l]`` is the block of layer l.
    """

    layer_names: list[str]  # name inside its block, e.g. "mlp.down_proj"
    layer_block: np.ndarray  # (L,) int
    layer_shapes: np.ndarray  # (L, 2) int: (out_features, in_features)
    block_mean_score: np.ndarray  # (B,) float64: Ā per block
    ratio_counts_above: np.ndarray  # (L, len(M_GRID)) int64
    score_hist: np.ndarray  # (L, len(SCORE_EDGES)+1) int64
    input_norms: list[np.ndarray]  # L arrays of (in_features,) float64
    layer_alpha: np.ndarray  # (L,) float64: PL_Alpha_Hill of each weight's WᵀW spectrum (AlphaPruning)
    meta: dict = field(default_factory=dict)
    #: (L,) int64: calibration tokens each layer saw (a routed expert's matrices: the tokens routed to it); None in
    #: statistics written before it was kept
    layer_tokens: np.ndarray | None = None

    # -- sizes ---------------------------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return int(self.layer_block.max()) + 1

    @property
    def layer_numel(self) -> np.ndarray:
        return self.layer_shapes[:, 0].astype(np.int64) * self.layer_shapes[:, 1]

    @property
    def block_numel(self) -> np.ndarray:
        return np.bincount(self.layer_block, weights=self.layer_numel, minlength=self.n_blocks).astype(np.int64)

    @property
    def layers_per_block(self) -> list[str]:
        """The kinds of layer a block has, in order of first appearance: a layer's name, with a routed expert's index
        replaced by ``*`` (``mlp.experts.*.down_proj``), so that every expert's matrix of one kind is one column."""
        return layer_kinds(self.layer_names)

    def _per_block_and(self, column: list, columns: list, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(B, len(columns)) Σ values ÷ Σ weights over the layers of each (block, column); NaN where a block has
        no such layer (e.g. the dense first blocks of a DeepSeek-style model)."""
        index = {c: j for j, c in enumerate(columns)}
        cols = np.array([index[c] for c in column])
        num = np.zeros((self.n_blocks, len(columns)))
        den = np.zeros((self.n_blocks, len(columns)))
        np.add.at(num, (self.layer_block, cols), values)
        np.add.at(den, (self.layer_block, cols), weights)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

    @property
    def layer_expert(self) -> np.ndarray:
        """(L,) int: each layer's routed expert, −1 for a layer that is not an expert's."""
        return np.array([-1 if (e := expert_index(n)) is None else e for n in self.layer_names], dtype=np.int64)

    @property
    def experts_per_block(self) -> int:
        """The most routed experts any block has (0: a dense model)."""
        return int(self.layer_expert.max()) + 1

    def _per_block_and_expert(self, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(B, experts) Σ values ÷ Σ weights over each expert's layers (``_per_block_and``; non-expert layers are
        left out)."""
        experts = self.layer_expert
        if not (experts >= 0).any():
            raise ValueError("this model has no routed experts")
        mine = experts >= 0
        columns = list(range(self.experts_per_block)) + [-1]  # -1: the layers that are not experts', dropped
        return self._per_block_and(list(experts), columns, values * mine, weights * mine)[:, :-1]

    def expert_matrix(self, m: float) -> np.ndarray:
        """Block × expert outlier ratio: the share of all of an expert's scores above M·Ā of its block.
        (B, experts); NaN where a block has no such expert."""
        return self._per_block_and_expert(self._counts_at(m), self.layer_numel.astype(np.float64))

    def expert_token_share(self) -> np.ndarray:
        """Block × expert share of the routed calibration tokens each expert received (a row sums to 1 over its
        experts). (B, experts); needs statistics that kept the token counts."""
        if self.layer_tokens is None:
            raise ValueError("these statistics were computed before routed token counts were kept; recompute them")
        # one matrix per expert carries its token count: up_proj (every expert has one; its routed tokens enter it)
        entry = np.array([n.endswith(".up_proj") for n in self.layer_names], dtype=np.float64)
        tokens = self._per_block_and_expert(self.layer_tokens * entry, entry)
        return tokens / np.nansum(tokens, axis=1, keepdims=True)

    # -- queries -------------------------------------------------------------------------------------------
    def _counts_at(self, m: float) -> np.ndarray:
        """#{A_ij > m·Ā} per layer, exact at grid points, linearly interpolated between them. (L,) float64."""
        m = float(m)
        if not (M_GRID[0] <= m <= M_GRID[-1]) or not np.isfinite(m):
            raise ValueError(f"M must be in [{M_GRID[0]:g}, {M_GRID[-1]:.0f}]; got {m:g}")
        k = int(np.searchsorted(M_GRID, m))
        if k < len(M_GRID) and np.isclose(M_GRID[k], m, rtol=_GRID_MATCH_RTOL, atol=0):
            return self.ratio_counts_above[:, k].astype(np.float64)
        if k > 0 and np.isclose(M_GRID[k - 1], m, rtol=_GRID_MATCH_RTOL, atol=0):
            return self.ratio_counts_above[:, k - 1].astype(np.float64)
        lo, hi = M_GRID[k - 1], M_GRID[k]
        t = (m - lo) / (hi - lo)
        return (1 - t) * self.ratio_counts_above[:, k - 1] + t * self.ratio_counts_above[:, k]

    def lod(self, m: float) -> np.ndarray:
        """Layerwise Outlier Distribution: per block, the share of scores above M·Ā (in [0, 1]). (B,)"""
        counts = np.bincount(self.layer_block, weights=self._counts_at(m), minlength=self.n_blocks)
        return counts / self.block_numel

    def layer_outlier_ratios(self, m: float) -> np.ndarray:
        """Per layer, the share of its scores above M·Ā of its block (the block's LOD is their weighted mean). (L,)"""
        return self._counts_at(m) / self.layer_numel

    def outlier_matrix(self, m: float) -> np.ndarray:
        """Block × layer-kind matrix of outlier ratios (for a heatmap), columns as ``layers_per_block``: a routed
        expert's kind is pooled over the block's experts. (B, kinds); NaN where a block lacks a kind."""
        return self._per_block_and([expert_kind(n) for n in self.layer_names], self.layers_per_block,
                                   self._counts_at(m), self.layer_numel.astype(np.float64))

    def ratio_distribution(self, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of A/Ā for one block (or all): (edges (K,), counts (K+1,)).

        counts[0] is #{A/Ā ≤ edges[0]}, counts[i] is #{edges[i-1] < A/Ā ≤ edges[i]}, counts[K] is #{A/Ā > edges[-1]}.
        Edges are grid points, roughly ``RATIO_PLOT_PER_DECADE`` per decade, so every count is exact.
        """
        rows = slice(None) if block is None else self.layer_block == block
        if block is not None and not (0 <= block < self.n_blocks):
            raise ValueError(f"block must be in [0, {self.n_blocks - 1}]; got {block}")
        above = self.ratio_counts_above[rows].sum(axis=0)  # (G,)
        targets = 10.0 ** (np.arange(np.ceil(np.log10(M_GRID[0]) * RATIO_PLOT_PER_DECADE),
                                     np.floor(np.log10(M_GRID[-1]) * RATIO_PLOT_PER_DECADE) + 1)
                           / RATIO_PLOT_PER_DECADE)
        idx = np.unique(np.abs(np.log(M_GRID)[None, :] - np.log(targets)[:, None]).argmin(axis=1))
        total = int(self.layer_numel[rows].sum())
        cum_above = above[idx]
        counts = np.concatenate([[total - cum_above[0]], -np.diff(cum_above), [cum_above[-1]]])
        return M_GRID[idx], counts.astype(np.int64)

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, folder: Path, key: str | None = None) -> None:
        """Write ``stats.npz`` and ``meta.json`` into ``folder``; the meta holds the arrays' sha256 and, given, the
        statistics spec's ``key``, which ``load`` verifies."""
        folder = Path(folder)
        offsets = np.cumsum([0] + [len(n) for n in self.input_norms])
        np.savez_compressed(
            folder / "stats.npz",
            layer_block=self.layer_block,
            layer_shapes=self.layer_shapes,
            block_mean_score=self.block_mean_score,
            ratio_counts_above=self.ratio_counts_above,
            score_hist=self.score_hist,
            input_norms=np.concatenate(self.input_norms),
            input_norm_offsets=offsets,
            layer_alpha=self.layer_alpha,
            m_grid=M_GRID,
            **({"layer_tokens": self.layer_tokens} if self.layer_tokens is not None else {}),
        )
        (folder / "meta.json").write_text(
            json.dumps({**self.meta, "layer_names": self.layer_names, "format": STATS_FORMAT_VERSION,
                        **({SPEC_KEY: key} if key else {}), NPZ_SHA256: file_sha256(folder / "stats.npz")}, indent=2)
        )

    @classmethod
    def load(cls, folder: Path, key: str | None = None) -> "Stats":
        """The statistics saved in ``folder``, verified: the arrays' checksum, and (given ``key``) that they were
        saved for that statistics spec. ``CorruptStatistics`` names the folder and the way out otherwise."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if not isinstance(meta, dict):
                raise ValueError("meta.json is not an object")
        except (OSError, ValueError) as err:
            raise CorruptStatistics(folder, f"meta.json is unreadable ({err})") from err
        if meta.get("format") != STATS_FORMAT_VERSION:
            raise ValueError(f"{folder} holds stats format {meta.get('format')}, expected {STATS_FORMAT_VERSION}")
        problem = verification_problem(folder, meta, key)
        if problem:
            raise CorruptStatistics(folder, problem)
        try:
            z = np.load(folder / "stats.npz")
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise CorruptStatistics(folder, f"stats.npz is unreadable ({err})") from err
        with z:
            if not np.array_equal(z["m_grid"], M_GRID):
                raise ValueError(f"{folder} was written with another M grid; recompute the statistics")
            offsets = z["input_norm_offsets"]
            norms = z["input_norms"]
            names = meta.pop("layer_names")
            for field_name in ("format", SPEC_KEY, NPZ_SHA256):
                meta.pop(field_name, None)
            return cls(
                layer_names=names,
                layer_block=z["layer_block"],
                layer_shapes=z["layer_shapes"],
                block_mean_score=z["block_mean_score"],
                ratio_counts_above=z["ratio_counts_above"],
                score_hist=z["score_hist"],
                input_norms=[norms[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
                layer_alpha=z["layer_alpha"],
                meta=meta,
                layer_tokens=z["layer_tokens"] if "layer_tokens" in z.files else None,
            )


class StatsBuilder:
    """Accumulates per-block summaries into ``Stats`` (used by the collector, and directly on hand-made weights)."""

    def __init__(self):
        self.names: list[str] = []
        self.blocks: list[int] = []
        self.shapes: list[tuple[int, int]] = []
        self.means: list[float] = []
        self.summaries: list[LayerSummary] = []
        self.alphas: list[float] = []
        self.tokens: list[int] | None = []

    def add_block(self, names: list[str], weights: list[torch.Tensor], input_norms: list[torch.Tensor],
                  tokens: list[int] | None = None) -> None:
        """Add the next block: its layers' names, (out, in) weights, (in,) input norms ‖X_j‖₂ and, when known, the
        calibration tokens each layer saw."""
        mean, summaries = summarize_block(weights, input_norms)
        index = len(self.means)
        self.names += names
        self.blocks += [index] * len(names)
        self.shapes += [(int(w.shape[0]), int(w.shape[1])) for w in weights]
        self.means.append(mean)
        self.summaries += summaries
        self.alphas += [layer_alpha(w) for w in weights]
        self.tokens = self.tokens + list(tokens) if tokens is not None and self.tokens is not None else None

    def result(self, meta: dict | None = None) -> Stats:
        if not self.summaries:
            raise ValueError("no blocks were added")
        return Stats(
            layer_names=self.names,
            layer_block=np.asarray(self.blocks, dtype=np.int64),
            layer_shapes=np.asarray(self.shapes, dtype=np.int64),
            block_mean_score=np.asarray(self.means, dtype=np.float64),
            ratio_counts_above=np.stack([s.ratio_counts_above for s in self.summaries]),
            score_hist=np.stack([s.score_hist for s in self.summaries]),
            input_norms=[s.input_norm for s in self.summaries],
            layer_alpha=np.asarray(self.alphas, dtype=np.float64),
            meta=meta or {},
            layer_tokens=np.asarray(self.tokens, dtype=np.int64) if self.tokens is not None else None,
        )


class StatsCollector(StatsBuilder):
    """A ``BlockObserver`` for ``run_blockwise`` that builds ``Stats`` on the dense model (changes no weight)."""

    def __init__(self):
        super().__init__()
        self._observer: _InputNormObserver | None = None

    def attach(self, index, block, layers):
        self._observer = _InputNormObserver(layers)
        return self._observer.hooks()

    def finish(self, index, block, layers) -> bool:
        norms, tokens = self._observer.norms(), self._observer.tokens
        self._observer = None
        names = list(layers)
        missing = [n for n in names if n not in norms and not is_expert_unit(n)]
        if missing:
            from pruner.engine.calibrate import LayerNeverRan

            raise LayerNeverRan(index, missing)
        # an expert no calibration token was routed to: its inputs' norms are zero (so are its Wanda scores)
        for n in names:
            if n not in norms:
                norms[n] = torch.zeros(weight_matrix(layers[n]).shape[1], dtype=torch.float64,
                                       device=weight_matrix(layers[n]).device)
        self.add_block(names, [weight_matrix(layers[n]) for n in names], [norms[n] for n in names],
                       [tokens.get(n, 0) for n in names])
        return False


def collect_stats(model: nn.Module, tokens: torch.Tensor, device, batch_size: int = 4, progress=None, should_cancel=None,
                  blocks=None, offload: bool = False) -> Stats:
    """Run the calibration loop on a dense model and return its ``Stats`` (timing in ``meta['seconds']``);
    ``blocks``: where the blocks' weights come from, ``offload``: activations in CPU memory
    (``pruner.engine.calibrate.run_blockwise``)."""
    from pruner.engine.calibrate import run_blockwise

    collector = StatsCollector()
    t0 = time.perf_counter()
    run_blockwise(model, tokens, collector, device=device, batch_size=batch_size, progress=progress,
                  should_cancel=should_cancel, blocks=blocks, offload=offload)
    return collector.result({"seconds": round(time.perf_counter() - t0, 3)})
