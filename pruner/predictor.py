"""Predicted perplexity of any allocation before pruning it: a table of single-block damages (issue 13).

**What is measured, once per model, calibration set, method and target S** (``build_damage_table``, a background
job): on a held-out text that is neither the calibration data nor the WikiText-2 test split (by default evenly
spaced windows of WikiText-2 *validation*), the mean negative log-likelihood of every window for a *reference*
model and for each block b moved alone to each sparsity g_k of a grid, the other blocks as in the reference. The
reference is every block pruned at the operating point S₀ (``PredictorSpec.around``; grid S₀ − 0.3 … S₀ + 0.3,
``operating_grid``) — or, in the first version (``around=None``), the dense model, grid 0.2 … 0.95. Blocks are
pruned with the method's scores on the dense model's inputs: Wanda's A_ij = |W_ij|·‖X_j‖₂ (‖X_j‖₂ from the cached
statistics, the same calibration inputs the prune reads) or magnitude's |W_ij|, lowest per output row. This costs
K · L(L + 1)/2 block forwards of the held-out windows (K grid points, L blocks): the reference's hidden states
entering block b are computed once, and only blocks b … L − 1 and the head run again for each g_k.

**What is predicted, in microseconds** (``DamageTable.predict``): for per-block sparsities s_b,

    NLL_w(s) = NLL_w(ref) + Σ_b Δ_{b,w}(s_b),    Δ_{b,w}(g) = NLL_w(block b moved to g) − NLL_w(ref),

with Δ_{b,w} interpolated linearly between grid points (Δ = 0 at the reference's sparsity, S₀ or 0), and
perplexity exp(mean_w NLL_w(s)). Its interval is the t-interval over the held-out windows of the predicted NLL_w
(exp of it): how precisely the held-out text pins the prediction, not how wrong the assumptions below can make it.

**Compounding** (``fit_compounding``): with every table, ``COMPOUNDING_PROBES`` random allocations around S₀
(``probe_allocations``: random walks over the blocks, none an allocator's) are measured *whole* on the same windows
(``measure_allocations``), and two non-negative numbers are fitted to what the sum misses:

    NLL_w(s) = NLL_w(ref) + Σ_b Δ_{b,w}(s_b) + γ₊ · 2 Σ_{b<c} Δ⁺_{b,w} Δ⁺_{c,w} + γ₋ · 2 Σ_{b<c} Δ⁻_{b,w} Δ⁻_{c,w},

damages (Δ > 0) that compound and gains (Δ < 0) that saturate, pair by pair (one block moved alone is its table
row exactly). The probes cost about one held-out forward each.

**Assumptions, stated so that they can be measured** (docs/results.md):
* *Additivity up to the two squared terms*: a pruned block's output is a later block's input, so moves interact;
  the table around S₀ measures each move inside a model already pruned at S₀, and the fit gives every pair of
  damaged blocks (and every pair of relieved ones) the same interaction weight — not which blocks interact most.
* *Block granularity*: a layer-granular allocation (ER, global, BESA) is read by each block's parameter-weighted
  mean sparsity, or by ``predict_layers``'s energy-equivalent sparsity.
* *One-shot masks on dense inputs*: sequential pruning (later blocks calibrated on pruned earlier blocks) and
  SparseGPT's weight updates are not modelled; the table's method is the mask it was built with.

**Measured** (docs/results.md, SmolLM2, Wanda, 25–26 allocations per S, measured on 8 test chunks): Spearman
ρ(predicted, measured) with the dense-reference table 0.46 at S = 50% and 0.13 at 70% (a block pruned alone in a
dense model overstates what the late blocks cost inside a pruned one); with the table around S, energy-equivalent
block sparsities, 0.93 at 50% (the probes find no compounding there: γ₊ = γ₋ = 0) and 0.85 at 70% without the
fit, 0.91 with it (one seed per measurement; 0.905–0.916 against three-seed means). Measuring the checked allocations whole in the table's own setting
showed where the sum failed at 70%: those whole measurements rank the real prunes at 0.96, the sum ranked the
whole measurements at only 0.86 — allocations that prune many consecutive early blocks well above S (OWL with
M = 3 and λ ≥ 0.12, AlphaPruning ε = 0.3) collapse while their damages, added, looked moderate.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pruner.calibrate import Cancelled, ProgressFn
from pruner.intervals import t_interval
from pruner.specs import StatsSpec, stable_hash

#: Sparsities at which each block alone is pruned. The predictor refuses a block sparsity above the last one
#: rather than extrapolate. Below the first point Δ is interpolated from Δ(0) = 0: on SmolLM2 (table 4d01fc5a998f289b,
#: which had a 10% point) a block alone at 10% costs at most 0.0025 nats and the interpolation errs there by at most
#: 0.0023, against up to 7 nats at 95%; the point cost a tenth of the table's build time.
DEFAULT_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: An operating-point table's grid: S₀ plus these offsets, any point above the top of DEFAULT_GRID replaced by it and
#: any below 0 dropped. ±0.3 keeps ATP's and DLP's slider ranges inside the table. On SmolLM2 (docs/results.md)
#: S₀ + 0.05 was the point whose removal changed the ranking least (Spearman 0.826 → 0.812 at 50%, 0.842 → 0.851
#: at 70%), and without it the build fits the cost target of 20 plain forwards.
OPERATING_OFFSETS = (-0.3, -0.2, -0.1, -0.05, 0.1, 0.2, 0.3)
#: Held-out windows: evenly spaced windows of WikiText-2 validation (never the test split).
HOLDOUT_SPLIT = "validation"
DEFAULT_WINDOWS = 4
DEFAULT_WINDOW_TOKENS = 512
#: Methods whose masks the table can be built with (scores from the weights and cached statistics alone).
TABLE_METHODS = ("wanda", "magnitude")
#: Bump when the table's definition changes (part of the cache key). 2: the held-out windows run as one batch.
#: 3: the table also holds each layer's removed score energy (``predict_layers``).
TABLE_FORMAT = 3
#: Resolution of the removed-score-energy curves E_l(g): sparsities 0, 0.01, …, 1.
ENERGY_STEP = 0.01


@dataclass(frozen=True)
class PredictorSpec:
    """Which damage table: the model and calibration set (``stats``: whose ‖X_j‖₂ the Wanda scores read), the
    method whose masks prune each block, the held-out windows and the sparsity grid."""

    stats: StatsSpec
    method: str = "wanda"
    windows: int = DEFAULT_WINDOWS
    window_tokens: int = DEFAULT_WINDOW_TOKENS
    #: None: DEFAULT_GRID, or ``operating_grid(around)`` for an operating-point table
    grid: tuple[float, ...] | None = None
    #: The operating point S₀: None measures each block's damage in an otherwise dense model; a sparsity measures
    #: it with every other block pruned at S₀, against the model with all blocks at S₀ (``build_damage_table``).
    around: float | None = None

    def __post_init__(self):
        if self.method not in TABLE_METHODS:
            raise ValueError(f"the predictor's table is built with {' or '.join(TABLE_METHODS)} masks; got "
                             f"{self.method!r}")
        if not (isinstance(self.windows, int) and self.windows >= 2):
            raise ValueError(f"held-out windows must be an integer ≥ 2 (the interval needs two); got {self.windows!r}")
        if not (isinstance(self.window_tokens, int) and self.window_tokens >= 2):
            raise ValueError(f"held-out window length must be an integer ≥ 2 tokens; got {self.window_tokens!r}")
        if self.around is not None:
            if not (isinstance(self.around, (int, float)) and 0 < self.around < 1):
                raise ValueError(f"the operating point S₀ must lie in (0, 1); got {self.around!r}")
            # a slider's 0.7000000000000001 is the table around 0.7
            object.__setattr__(self, "around", round(float(self.around), 6))
        if self.grid is None:
            object.__setattr__(self, "grid", DEFAULT_GRID if self.around is None else operating_grid(self.around))
        grid = tuple(float(g) for g in self.grid)
        if not grid or any(not (0 < g < 1) for g in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
            raise ValueError(f"the sparsity grid must be increasing values in (0, 1); got {self.grid!r}")
        object.__setattr__(self, "grid", grid)
        if self.around is not None and any(abs(g - self.around) < 1e-9 for g in grid):
            raise ValueError(f"the grid must not contain the operating point {self.around:g} (Δ is 0 there by "
                             f"definition); got {list(grid)}")

    def identity(self) -> dict:
        out = {"model": self.stats.model.identity(), "calib": self.stats.calib.identity(), "method": self.method,
               "holdout": {"dataset": f"wikitext2-{HOLDOUT_SPLIT}", "windows": self.windows,
                           "window_tokens": self.window_tokens},
               "grid": list(self.grid), "format": TABLE_FORMAT}
        if self.around is not None:  # absent for dense-reference tables, whose keys stay what they were
            out["around"] = self.around
        return out

    def key(self) -> str:
        return stable_hash(self.identity())


def operating_grid(around: float, offsets=OPERATING_OFFSETS, top: float = DEFAULT_GRID[-1]) -> tuple[float, ...]:
    """The grid of an operating-point table at S₀ = ``around``: S₀ + each offset, kept in (0, ``top``], with ``top``
    itself when an offset passes it (e.g. S₀ = 0.7: 0.4, 0.5, 0.6, 0.65, 0.8, 0.9, 0.95)."""
    points = {round(min(around + d, top), 6) for d in offsets if around + d > 0}
    return tuple(sorted(p for p in points if abs(p - around) > 1e-9))


@dataclass(frozen=True)
class Prediction:
    perplexity: float
    low: float | None  # 95% interval over the held-out windows
    high: float | None
    block_delta_nll: np.ndarray  # (B,) each block's predicted contribution Δ_b(s_b), mean over windows
    compounding_nll: float = 0.0  # the compounding terms, mean over windows (``fit_compounding``)

    def text(self) -> str:
        interval = f" [{self.low:.1f}, {self.high:.1f}]" if self.low is not None else ""
        return f"predicted perplexity {self.perplexity:.1f}{interval}"


@dataclass
class DamageTable:
    """Single-block damages of one model (see the module's docstring).

    grid (K,); dense_nll (W,) mean NLL per held-out window of the reference model (dense, or every block at the
    operating point ``anchor``); window_nll (B, K, W) with block b pruned at grid[k] and every other block as in the
    reference; block_numel (B,) prunable weights per block. Δ_b = 0 at ``anchor`` (0: the dense reference)."""

    grid: np.ndarray
    dense_nll: np.ndarray
    window_nll: np.ndarray
    block_numel: np.ndarray
    meta: dict = field(default_factory=dict)
    #: (n_layers, 1/ENERGY_STEP + 1) E_l(g): Σ over the layer's rows of the squared scores its mask at sparsity g
    #: removes (Wanda's A_ij², or W_ij² for magnitude), in the statistics' layer order; None in older tables
    layer_energy: np.ndarray | None = None
    layer_block: np.ndarray | None = None
    anchor: float = 0.0
    #: The probes measured whole for the compounding fit ({"probes", "probe_nll", …}, ``measure_compounding``);
    #: None: predictions are purely additive
    compounding: dict | None = None

    @property
    def gamma(self) -> np.ndarray:
        """(γ₊, γ₋) of the compounding terms, fitted from the stored probes (``fit_compounding``, microseconds);
        (0, 0) when the table has none."""
        if self.compounding is None:
            return np.zeros(len(COMPOUNDING_TERMS))
        if "_gamma" not in self.compounding:  # fitted once per loaded table, from the measurements on disk
            self.compounding["_gamma"] = fit_compounding(self, np.asarray(self.compounding["probes"]),
                                                         np.asarray(self.compounding["probe_nll"]))
        return self.compounding["_gamma"]

    @property
    def n_blocks(self) -> int:
        return self.window_nll.shape[0]

    @property
    def dense_perplexity(self) -> float:
        """Perplexity of the reference model on the held-out windows (dense, or every block at the anchor)."""
        return float(math.exp(self.dense_nll.mean()))

    def reference_text(self) -> str:
        """What the damages were measured against, in words for a caption."""
        return ("a dense model (each block pruned alone)" if self.anchor == 0 else
                f"a model with every block at {self.anchor:.0%} (each block moved alone from there)")

    def points(self) -> np.ndarray:
        """The sparsities Δ is known at: the grid with the anchor inserted in order (K + 1,)."""
        return np.sort(np.concatenate([[self.anchor], self.grid]))

    def delta(self) -> np.ndarray:
        """Δ (B, K + 1, W) at ``points()``: the grid's with Δ = 0 inserted at the anchor."""
        d = self.window_nll - self.dense_nll[None, None, :]
        at = int(np.searchsorted(self.grid, self.anchor))
        return np.concatenate([d[:, :at], np.zeros((d.shape[0], 1, d.shape[2])), d[:, at:]], axis=1)

    def per_block_delta(self, block_sparsity) -> np.ndarray:
        """Δ_{b,w}(s_b) of per-block sparsities s_b (B,), each in the range the table measured, interpolated
        linearly between its points. (B, W)"""
        s = np.asarray(block_sparsity, dtype=np.float64)
        if s.shape != (self.n_blocks,):
            raise ValueError(f"one sparsity per block ({self.n_blocks}) is needed; got shape {s.shape}")
        points = self.points()
        bottom, top = float(points[0]), float(points[-1])
        if s.min() < bottom - 1e-12 or s.max() > top + 1e-12:
            raise ValueError(f"block sparsities must lie in [{bottom:g}, {top:g}], the range the damage table "
                             f"measured; got {s.min():.3f}…{s.max():.3f} (build a table whose grid reaches further)")
        upper = np.clip(np.searchsorted(points, s, side="right"), 1, len(points) - 1)  # s in [points[u−1], points[u]]
        lower = upper - 1
        weight = (s - points[lower]) / (points[upper] - points[lower])
        d = self.delta()
        rows = np.arange(self.n_blocks)
        return d[rows, lower] * (1 - weight)[:, None] + d[rows, upper] * weight[:, None]

    def predict(self, block_sparsity, compounding: bool = True) -> Prediction:
        """Predicted perplexity of per-block sparsities s_b (B,), each in the range the table measured: the
        reference's NLL plus each block's damage, plus the compounding terms (products of pairs of damages, and of
        gains, weighted by γ₊ and γ₋) when the table has probes and ``compounding`` is true (per window; see
        ``fit_compounding``)."""
        per_block = self.per_block_delta(block_sparsity)
        extra = compounding_features(per_block) @ self.gamma if compounding else np.zeros(per_block.shape[1])
        window_nll = self.dense_nll + per_block.sum(axis=0) + extra
        ci = t_interval(window_nll)
        return Prediction(float(math.exp(window_nll.mean())),
                          None if ci.low is None else float(math.exp(ci.low)),
                          None if ci.high is None else float(math.exp(ci.high)), per_block.mean(axis=1),
                          float(extra.mean()))

    def equivalent_block_sparsity(self, layer_sparsity) -> np.ndarray:
        """Per block, the uniform sparsity g_b whose masks would remove as much squared score as the allocation's
        per-layer sparsities s_l do: Σ_{l∈b} E_l(g_b) = Σ_{l∈b} E_l(s_l) (each E_l read between lattice points).
        Equal to the block's mean when its layers share one sparsity; above it when the allocation prunes harder
        where the scores are large (e.g. Erdős–Rényi's denser pruning of the large MLP matrices). (B,)"""
        if self.layer_energy is None:
            raise ValueError("this damage table predates per-layer energies; rebuild it (`pruner predict`)")
        s = np.asarray(layer_sparsity, dtype=np.float64)
        if s.shape != self.layer_block.shape:
            raise ValueError(f"one sparsity per layer ({len(self.layer_block)}) is needed; got shape {s.shape}")
        lattice = np.arange(self.layer_energy.shape[1]) * ENERGY_STEP
        if s.min() < 0 or s.max() > lattice[-1] + 1e-12:
            raise ValueError(f"layer sparsities must lie in [0, {lattice[-1]:g}]; got {s.min():.3f}…{s.max():.3f}")
        removed = np.array([np.interp(v, lattice, e) for v, e in zip(s, self.layer_energy)])
        out = np.zeros(self.n_blocks)
        for b in range(self.n_blocks):
            rows = self.layer_block == b
            if np.ptp(s[rows]) == 0:  # one shared sparsity: its own equivalent (also where E is flat between
                out[b] = s[rows][0]   # lattice points, as for layers narrower than 1 / ENERGY_STEP)
                continue
            curve = self.layer_energy[rows].sum(axis=0)  # uniform-in-block removal, non-decreasing in g
            out[b] = np.interp(removed[rows].sum(), curve, lattice)
        return out

    def predict_layers(self, layer_sparsity, compounding: bool = True) -> Prediction:
        """``predict`` of the equivalent block sparsities (``equivalent_block_sparsity``): sees how an allocation
        spreads inside each block, which the block means alone do not."""
        return self.predict(self.equivalent_block_sparsity(layer_sparsity), compounding)

    def predict_allocation(self, block_sparsity, layer_sparsity=None) -> Prediction:
        """What the pages and tuning show: ``predict_layers`` when the table has per-layer energies and the
        allocation's per-layer sparsities are given (they match the table's layers), else ``predict`` of the block
        means. The two agree for allocations that give every layer of a block the same sparsity."""
        if (layer_sparsity is not None and self.layer_energy is not None
                and len(layer_sparsity) == len(self.layer_block)):
            return self.predict_layers(layer_sparsity)
        return self.predict(block_sparsity)

    def save(self, folder: Path) -> None:
        extra = ({"layer_energy": self.layer_energy, "layer_block": self.layer_block}
                 if self.layer_energy is not None else {})
        np.savez(folder / "table.npz", grid=self.grid, dense_nll=self.dense_nll, window_nll=self.window_nll,
                 block_numel=self.block_numel, anchor=self.anchor, **extra)
        (folder / "meta.json").write_text(json.dumps(self.meta, indent=1))
        if self.compounding is not None:
            save_compounding(folder, {k: v for k, v in self.compounding.items() if not k.startswith("_")})

    @classmethod
    def load(cls, folder: Path) -> "DamageTable":
        z = np.load(folder / "table.npz")
        fit = folder / COMPOUNDING_FILE
        return cls(z["grid"], z["dense_nll"], z["window_nll"], z["block_numel"],
                   json.loads((folder / "meta.json").read_text()),
                   z["layer_energy"] if "layer_energy" in z else None,
                   z["layer_block"] if "layer_block" in z else None,
                   float(z["anchor"]) if "anchor" in z else 0.0,
                   json.loads(fit.read_text()) if fit.is_file() else None)


#: The compounding terms, in the order of (γ₊, γ₋): damages that compound, gains that saturate. Each is the sum
#: over pairs of distinct blocks, 2 Σ_{b<c} x_b x_c = (Σ_b x_b)² − Σ_b x_b², of the damages (x = Δ⁺) or of the
#: gains (x = Δ⁻): zero when one block moves alone, so the table's own rows are predicted exactly.
COMPOUNDING_TERMS = ("2 Σ_{b<c} Δ⁺_b Δ⁺_c", "2 Σ_{b<c} Δ⁻_b Δ⁻_c")


def compounding_features(per_block: np.ndarray) -> np.ndarray:
    """Per window, the pairwise products of the blocks' damages (increases of the loss) and of their gains
    (decreases), each block counted in one of the two: (Σ x)² − Σ x² for x = Δ⁺ and x = Δ⁻.
    per_block: (B, W) → (W, 2)"""
    pos, neg = np.clip(per_block, 0, None), np.clip(per_block, None, 0)
    return np.stack([pos.sum(axis=0) ** 2 - (pos ** 2).sum(axis=0),
                     neg.sum(axis=0) ** 2 - (neg ** 2).sum(axis=0)], axis=1)


#: The compounding fit is stored next to the table it corrects (an older table gets one without being rebuilt).
COMPOUNDING_FILE = "compounding.json"
#: Probe allocations measured whole for the fit, their seed, and the spreads r (max |s_b − S₀|) they cycle through.
COMPOUNDING_PROBES = 8
COMPOUNDING_SEED = 0
COMPOUNDING_SPREADS = (0.05, 0.1, 0.15, 0.2)


def save_compounding(folder: Path, fit: dict) -> None:
    """Write the fit beside the table atomically (a reader sees the whole file or none)."""
    import os

    tmp = folder / f".{COMPOUNDING_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(fit, indent=1))
    os.replace(tmp, folder / COMPOUNDING_FILE)


def probe_allocations(table: DamageTable, probes: int = COMPOUNDING_PROBES, seed: int = COMPOUNDING_SEED,
                      spreads=COMPOUNDING_SPREADS) -> np.ndarray:
    """Per-block sparsities of the compounding fit's probes: S₀ + r · z, z a random walk over the blocks (cumulative
    sum of standard normal steps, centred, scaled to max |z| = 1), so that neighbouring blocks move together as the
    allocators move them; r cycles through ``spreads``; each s_b clipped to the range the table measured. None of
    them is an allocator's allocation. (probes, B)"""
    rng = np.random.default_rng(seed)
    points = table.points()
    out = np.zeros((probes, table.n_blocks))
    for i in range(probes):
        z = np.cumsum(rng.standard_normal(table.n_blocks))
        z -= z.mean()
        if np.abs(z).max() > 0:  # one block: no walk, the probe is the reference
            z /= np.abs(z).max()
        out[i] = np.clip(table.anchor + spreads[i % len(spreads)] * z, points[0], points[-1])
    return np.round(out, 4)


def fit_compounding(table: DamageTable, probe_block: np.ndarray, probe_nll: np.ndarray) -> np.ndarray:
    """(γ₊, γ₋) ≥ 0 of

        NLL_w(s) = NLL_w(ref) + Σ_b Δ_{b,w}(s_b) + γ₊ · 2 Σ_{b<c} Δ⁺_{b,w} Δ⁺_{c,w} + γ₋ · 2 Σ_{b<c} Δ⁻_{b,w} Δ⁻_{c,w}

    by non-negative least squares over the probes' measured held-out NLLs (every window of every probe one
    equation). γ₊ > 0: damages inside one model compound beyond their sum (a pruned block's output feeds the next);
    γ₋ > 0: gains saturate (moving many blocks below S₀ buys less than their sum). Both are held ≥ 0 (the stated
    direction of each; a term the probes do not support is 0, not reversed). probe_block (P, B); probe_nll (P, W)."""
    residual, features = [], []
    for s, nll in zip(probe_block, probe_nll):
        per_block = table.per_block_delta(s)
        residual.append(nll - table.dense_nll - per_block.sum(axis=0))
        features.append(compounding_features(per_block))
    return nonnegative_least_squares(np.concatenate(features), np.concatenate(residual))


def nonnegative_least_squares(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin_{x ≥ 0} ‖a x − y‖² for a few columns, exactly: the least-squares solution on each subset of columns
    (the others 0), the best feasible one. a (n, k), k small (2ᵏ subsets); y (n,). (k,)"""
    import itertools

    k = a.shape[1]
    best, best_x = np.inf, np.zeros(k)
    for size in range(k + 1):
        for cols in itertools.combinations(range(k), size):
            x = np.zeros(k)
            if cols:
                x[list(cols)] = np.linalg.lstsq(a[:, cols], y, rcond=None)[0]
            if np.any(x < 0):
                continue
            err = float(((a @ x - y) ** 2).sum())
            if err < best - 1e-15:
                best, best_x = err, x
    return best_x


def holdout_windows(tokenizer, data_dir, windows: int, window_tokens: int) -> torch.Tensor:
    """``windows`` evenly spaced, non-overlapping windows of ``window_tokens`` tokens of WikiText-2 validation:
    (windows, window_tokens)."""
    from pruner.data import wikitext2_text
    from pruner.evaluate.perplexity import chunk_stream

    ids = tokenizer(wikitext2_text(HOLDOUT_SPLIT, data_dir), return_tensors="pt").input_ids[0]
    chunks = chunk_stream(ids, window_tokens)
    if len(chunks) < windows:
        raise ValueError(f"WikiText-2 validation has {len(chunks)} windows of {window_tokens} tokens; asked for "
                         f"{windows}")
    return chunks[np.linspace(0, len(chunks) - 1, windows).round().astype(int)]


@torch.no_grad()
def _window_nll(model, hidden: list[torch.Tensor], windows: torch.Tensor, device) -> np.ndarray:
    """Mean NLL of each window's next-token predictions from the hidden states leaving the last block."""
    from pruner.evaluate.perplexity import IGNORE, _final_norm, summed_nll

    norm, head = _final_norm(model), model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    out = []
    rows = [row for h in hidden for row in h]  # one (T, hidden) per window, whatever the batching
    for h, ids in zip(rows, windows):
        logits = head(norm(h[None]))[0]
        if cap:
            logits = torch.tanh(logits / cap) * cap
        ids = ids.to(device)
        targets = torch.cat([ids[1:], torch.full_like(ids[:1], IGNORE)])
        out.append(summed_nll(logits, targets) / (len(ids) - 1))
    return np.array(out)


class _Holdout:
    """The held-out windows of ``spec`` and what running them through a model's blocks needs: the hidden states
    entering block 0, each block's call arguments, and each layer's mask scores (the method's, on the dense
    weights). Used as a context: the head and final norm sit on the compute device inside it."""

    def __init__(self, model, tokenizer, stats, spec: PredictorSpec, data_dir, device):
        from pruner.besa import block_input_norms
        from pruner.calibrate import capture_block_inputs
        from pruner.evaluate.perplexity import _final_norm
        from pruner.models import find_blocks

        self.model, self.spec, self.device = model, spec, torch.device(device)
        self.windows = holdout_windows(tokenizer, data_dir, spec.windows, spec.window_tokens)
        _, self.blocks = find_blocks(model)
        self.norms = block_input_norms(stats)
        if len(self.norms) != len(self.blocks):
            raise ValueError(f"the statistics have {len(self.norms)} blocks, the model {len(self.blocks)}")
        # all held-out windows in one batch: larger matrix products, the same numbers up to float rounding
        self.hidden, self.calls = capture_block_inputs(model, self.windows, self.device, batch_size=len(self.windows))
        self.home = next(model.parameters()).device
        self.head = (model.get_output_embeddings(), _final_norm(model))

    def __enter__(self):
        for module in self.head:
            module.to(self.device)
        return self

    def __exit__(self, *exc):
        for module in self.head:
            module.to(self.home)

    def tail(self, states: list[torch.Tensor], start: int) -> list[torch.Tensor]:
        """Hidden states leaving the last block, from ``states`` entering block ``start``."""
        from pruner.calibrate import _run_block

        for j in range(start, len(self.blocks)):
            self.blocks[j].to(self.device)
            states = _run_block(self.blocks[j], states, self.calls[j], self.device)
            self.blocks[j].to(self.home)
        return states

    def nll(self, states: list[torch.Tensor]) -> np.ndarray:
        """Mean NLL per window from the hidden states leaving the last block. (W,)"""
        return _window_nll(self.model, states, self.windows, self.device)

    def scores(self, b: int, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Block b's mask scores: Wanda's |W_ij|·‖X_j‖₂ (‖X_j‖₂ from the statistics) or magnitude's |W_ij|."""
        from pruner.scores import wanda_score

        return {n: (wanda_score(w, self.norms[b][n].to(self.device)) if self.spec.method == "wanda" else w.abs())
                for n, w in originals.items()}


def _set_weights(layers, originals, scores, g: float | None) -> None:
    """Every layer of a block dense (g None: a dense-reference table's reference) or with the row-wise mask of its
    scores at sparsity g."""
    from pruner.methods.masks import lowest_mask
    from pruner.anatomy import weight_matrix

    for n, layer in layers.items():
        weight_matrix(layer).copy_(originals[n] if g is None else originals[n] * ~lowest_mask(scores[n], g, "row"))


def _dense_weights(layers) -> dict[str, torch.Tensor]:
    from pruner.anatomy import weight_matrix

    return {n: weight_matrix(layer).detach().clone() for n, layer in layers.items()}


def _restore(blocks, originals_by_block: dict[int, dict[str, torch.Tensor]]) -> None:
    from pruner.anatomy import prunable_layers, weight_matrix

    for b, originals in originals_by_block.items():
        for n, layer in prunable_layers(blocks[b]).items():
            weight_matrix(layer).copy_(originals[n].to(weight_matrix(layer).device))


@torch.no_grad()
def build_damage_table(model, tokenizer, stats, spec: PredictorSpec, data_dir, device="cpu",
                       progress: ProgressFn | None = None,
                       should_cancel: Callable[[], bool] | None = None) -> DamageTable:
    """Measure the table (see the module's docstring) on a dense model in memory; the model is left unchanged.
    ``stats``: the dense statistics of ``spec.stats`` (Wanda's ‖X_j‖₂). ``progress`` counts blocks."""
    from pruner.calibrate import _run_block
    from pruner.anatomy import prunable_layers

    t0 = time.perf_counter()
    dense_weights: dict[int, dict[str, torch.Tensor]] = {}  # only with an operating point: every block's originals
    with _Holdout(model, tokenizer, stats, spec, data_dir, device) as h:
        blocks, hidden, device, home = h.blocks, h.hidden, h.device, h.home
        window_nll = np.zeros((len(blocks), len(spec.grid), spec.windows))
        numel = np.zeros(len(blocks))
        energy: dict[tuple[int, str], np.ndarray] = {}
        try:
            if spec.around is not None:  # the reference: every block pruned at S₀ (one-shot masks, dense inputs)
                for b, block in enumerate(blocks):
                    block.to(device)
                    layers = prunable_layers(block)
                    dense_weights[b] = _dense_weights(layers)
                    _set_weights(layers, dense_weights[b], h.scores(b, dense_weights[b]), spec.around)
                    block.to(home)
            dense_nll = h.nll(h.tail(list(hidden), 0))
            for b, block in enumerate(blocks):
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"cancelled before block {b} of {len(blocks)}")
                block.to(device)
                layers = prunable_layers(block)
                originals = dense_weights.get(b) or _dense_weights(layers)
                numel[b] = sum(w.numel() for w in originals.values())
                scores = h.scores(b, originals)
                for n, score in scores.items():
                    energy[(b, n)] = removed_energy(score)
                try:
                    for k, g in enumerate(spec.grid):
                        _set_weights(layers, originals, scores, g)
                        out = _run_block(block, hidden, h.calls[b], device)
                        block.to(home)
                        window_nll[b, k] = h.nll(h.tail(out, b + 1))
                        block.to(device)
                finally:
                    _set_weights(layers, originals, scores, spec.around)  # back to the reference
                hidden = _run_block(block, hidden, h.calls[b], device)  # the reference's input to the next block
                block.to(home)
                if progress is not None:
                    progress(b + 1, len(blocks))
        finally:
            _restore(blocks, dense_weights)  # the model leaves dense, as it came
    meta = {"key": spec.key(), **spec.identity(), "seconds": round(time.perf_counter() - t0, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dense_perplexity": float(math.exp(dense_nll.mean()))}
    layer_block = np.asarray(stats.layer_block)
    layer_energy = np.stack([energy[(int(b), n)] for b, n in zip(layer_block, stats.layer_names)])
    return DamageTable(np.array(spec.grid), dense_nll, window_nll, numel, meta, layer_energy, layer_block,
                       0.0 if spec.around is None else spec.around)


@torch.no_grad()
def measure_allocations(model, tokenizer, stats, spec: PredictorSpec, layer_sparsities, data_dir, device="cpu",
                        progress: ProgressFn | None = None) -> np.ndarray:
    """The held-out NLL per window that the table's setting gives each whole allocation: every layer l pruned at
    its own sparsity s_l by the table's one-shot masks (``spec.method``'s scores on the dense weights), the held-out
    windows of ``spec`` run through the model. What ``DamageTable.predict`` approximates by adding single-block
    moves; the uniform allocation at S₀ gives the operating-point table's reference exactly, and one block moved
    alone its table row. ``layer_sparsities``: one sequence per allocation, in the statistics' layer order. The
    model is left unchanged. (A, W)"""
    from pruner.methods.masks import prune_count
    from pruner.anatomy import prunable_layers, weight_matrix

    layer_block, names = np.asarray(stats.layer_block), list(stats.layer_names)
    allocations = [np.asarray(s, dtype=np.float64) for s in layer_sparsities]
    for s in allocations:
        if s.shape != layer_block.shape or s.min() < 0 or s.max() >= 1:
            raise ValueError(f"each allocation needs one sparsity in [0, 1) per layer ({len(layer_block)}); got "
                             f"shape {s.shape}" + (f", {s.min():.3f}…{s.max():.3f}" if s.size else ""))

    out = np.zeros((len(allocations), spec.windows))
    with _Holdout(model, tokenizer, stats, spec, data_dir, device) as h:
        dense, ranks = {}, {}
        try:
            for b, block in enumerate(h.blocks):
                block.to(h.device)
                dense[b] = _dense_weights(prunable_layers(block))
                # each weight's place in its row's stable ascending order: the mask at any sparsity is then one
                # comparison (rank < k), the same weights ``lowest_mask`` picks, ties by position included
                ranks[b] = {n: row_ranks(score) for n, score in h.scores(b, dense[b]).items()}
                block.to(h.home)
            for a, s in enumerate(allocations):
                for b, block in enumerate(h.blocks):
                    block.to(h.device)
                    here = {n: float(v) for n, v, lb in zip(names, s, layer_block) if lb == b}
                    for n, layer in prunable_layers(block).items():
                        w = dense[b][n]
                        weight_matrix(layer).copy_(w * (ranks[b][n] >= prune_count(w.shape[1], here[n])))
                    block.to(h.home)
                out[a] = h.nll(h.tail(list(h.hidden), 0))
                if progress is not None:
                    progress(a + 1, len(allocations))
        finally:
            _restore(h.blocks, dense)
    return out


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's position in its row's stable ascending sort (0 = lowest score): ``rank < round(g · in)`` is
    ``lowest_mask(scores, g, "row")`` for every g. (out, in), int16 when rows are shorter than 2¹⁵."""
    order = torch.sort(scores, dim=1, stable=True).indices
    dtype = torch.int16 if scores.shape[1] < 2 ** 15 else torch.int32
    positions = torch.arange(scores.shape[1], device=scores.device).to(dtype).expand_as(order)
    return torch.empty_like(order, dtype=dtype).scatter_(1, order, positions)


def removed_energy(scores: torch.Tensor) -> np.ndarray:
    """E(g) for g = 0, ENERGY_STEP, …: the sum over rows of the squared scores a row-wise mask at sparsity g removes
    (the round(g · in) lowest of each row, as ``lowest_mask`` prunes them). scores: (out, in)."""
    from pruner.methods.masks import prune_count

    squared = scores.detach().double().pow(2).sort(dim=1).values.cumsum(dim=1).sum(dim=0)  # (in,): k lowest per row
    lattice = np.arange(round(1 / ENERGY_STEP) + 1) * ENERGY_STEP
    ks = [scores.shape[1] if g >= 1 else prune_count(scores.shape[1], float(g)) for g in lattice]
    return np.array([float(squared[k - 1]) if k else 0.0 for k in ks])


def predictor_dir(spec: PredictorSpec, cache_dir: Path | None = None) -> Path:
    from pruner.cache import CacheLayout

    return CacheLayout.at(cache_dir).predictor(spec.key())


def cached_table(spec: PredictorSpec, cache_dir: Path | None = None) -> DamageTable | None:
    folder = predictor_dir(spec, cache_dir)
    return DamageTable.load(folder) if (folder / "meta.json").is_file() else None


def table_for(stats: StatsSpec, sparsity: float, cache_dir: Path | None = None) -> DamageTable | None:
    """The cached table that predicts allocations at ``sparsity`` best: the operating-point table at that S, else
    the dense-reference one, else None (nothing is built here)."""
    return (cached_table(PredictorSpec(stats, around=float(sparsity)), cache_dir)
            or cached_table(PredictorSpec(stats), cache_dir))


def get_damage_table(spec: PredictorSpec, cache_dir: Path | None = None, *, data_dir=None, loaded=None,
                     progress: ProgressFn | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> DamageTable:
    """The cached table for ``spec``, built (statistics first when missing) and cached when there is none."""
    from pruner.api import get_stats
    from pruner.models import load_model
    from pruner.store import atomic_dir

    found = cached_table(spec, cache_dir)
    if found is not None and found.compounding is not None:
        return found
    loaded = loaded if loaded is not None else load_model(spec.stats.model, cache_dir)
    if loaded.streamed:
        raise ValueError("the damage table is built with the model in memory; load it without streaming")
    stats = get_stats(spec.stats, cache_dir, loaded=loaded)
    blocks = len(stats.block_numel)
    steps = (0 if found is not None else blocks) + COMPOUNDING_PROBES  # progress: table blocks, then probes

    def report(done_before: int):
        return None if progress is None else (lambda done, _total: progress(done_before + done, steps))

    if found is None:
        table = build_damage_table(loaded.model, loaded.tokenizer, stats, spec, data_dir, loaded.device,
                                   progress=report(0), should_cancel=should_cancel)
    else:  # a table cached before the compounding fit existed: only the probes are measured
        table = found
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled before the compounding fit's probes")
    table.compounding = measure_compounding(table, loaded.model, loaded.tokenizer, stats, spec, data_dir,
                                            loaded.device, progress=report(steps - COMPOUNDING_PROBES))
    if found is None:
        with atomic_dir(predictor_dir(spec, cache_dir)) as tmp:
            table.save(tmp)
    else:
        save_compounding(predictor_dir(spec, cache_dir), table.compounding)
    return table


def measure_compounding(table: DamageTable, model, tokenizer, stats, spec: PredictorSpec, data_dir, device="cpu",
                        progress: ProgressFn | None = None) -> dict:
    """Measure the probes (``probe_allocations``) whole on the table's held-out windows. Returns what is stored
    beside the table: the probes, their NLLs and the time taken. The fit (γ₊, γ₋) is not stored: it is derived
    from these measurements when the table is read (``DamageTable.gamma``), so it always follows the code."""
    t0 = time.perf_counter()
    probes = probe_allocations(table)
    layer_block = np.asarray(stats.layer_block)
    nll = measure_allocations(model, tokenizer, stats, spec, [p[layer_block] for p in probes], data_dir, device,
                              progress=progress)
    return {"probes": probes.tolist(), "probe_nll": nll.tolist(),
            "seed": COMPOUNDING_SEED, "spreads": list(COMPOUNDING_SPREADS),
            "seconds": round(time.perf_counter() - t0, 2)}


#: Resolution of the predictor-optimal allocation's block sparsities (1%, BESA's candidate step).
OPTIMAL_STEP = 0.01


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
    units = S * B / step
    if abs(units - round(units)) > 1e-6:
        raise ValueError(f"S = {S:g} over {B} blocks is not a whole number of {step:g} steps of block sparsity "
                         f"(S · B / step = {units:.3f}); choose S as a multiple of {step:g}")
    total = int(round(units))
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
    """The learned-allocator protocol (``pruner.besa.Learner``) for the predictor-optimal allocation: the damage
    table around S (built or read from the cache, with the calibration set's statistics) and the dynamic programme.
    The operating-point table ranks allocations at S far better than the dense-reference one (docs/results.md)."""
    spec = PredictorSpec(context["spec"], around=sparsity)
    table = get_damage_table(spec, context.get("cache_dir"), data_dir=context["spec"].calib.data_dir,
                             loaded=context.get("loaded"), progress=context.get("progress"),
                             should_cancel=context.get("should_cancel"))
    if stats is None:
        from pruner.api import get_stats

        stats = get_stats(context["spec"], context.get("cache_dir"), loaded=context.get("loaded"))
    block = optimal_block_sparsity(table, sparsity, reach=params.get("reach"))
    layer_block = np.asarray(stats.layer_block)
    p = table.predict(block)
    return {"layer_names": list(stats.layer_names), "layer_block": layer_block.tolist(),
            "layer_sparsity": [float(v) for v in block[layer_block]], "block_sparsity": block.tolist(),
            "predictor": spec.key(), "predicted_perplexity": p.perplexity}, stats


#: Points per parameter when tuning against the predictor (over the parameter's slider range).
TUNE_POINTS = 11
#: Decimals the tuning grid's values are rounded to (far below any parameter's step).
TUNE_DECIMALS = 9


def tune_parameters(table: DamageTable, inputs, allocator: str, sparsity: float,
                    points: int = TUNE_POINTS) -> dict:
    """The allocator's parameters that minimise the predicted perplexity at S, searched over a grid of ``points``
    values per parameter across each parameter's slider range (``pruner.params.Param.slider``; a parameter without
    one keeps its default). Never reads the test split: the predictor's table was measured on held-out validation
    windows. Returns {"params", "predicted", "tried", "skipped"} (skipped: combinations outside an allocator's
    allowed range at this S)."""
    import itertools

    from pruner.allocation import ALLOCATORS, allocate

    a = ALLOCATORS[allocator]
    if a.learned:
        raise ValueError(f"{a.label} is learned, not computed from parameters on a grid; nothing to tune")
    # grid values rounded so that a tuned 0.15 is the run a user gets by typing 0.15 (linspace gives 0.15000000000000002)
    axes = {p.name: (np.round(np.linspace(p.slider[0], p.slider[1], points), TUNE_DECIMALS) if p.slider
                     else [p.default]) for p in a.params}
    best, tried, skipped = None, 0, 0
    for combo in itertools.product(*axes.values()):
        params = {n: float(v) for n, v in zip(axes, combo)}
        tried += 1
        try:
            a_ = allocate(allocator, inputs, sparsity, **params)
            predicted = table.predict_allocation(a_.block_sparsity, a_.layer_sparsity).perplexity
        except ValueError:
            skipped += 1
            continue
        if best is None or predicted < best[1]:
            best = (params, predicted)
    if best is None:
        raise ValueError(f"no {a.label} parameters on the tuning grid give an allocation the predictor can read at "
                         f"S = {sparsity:g}")
    return {"params": best[0], "predicted": best[1], "tried": tried, "skipped": skipped}


def spearman(predicted, measured) -> tuple[float, int]:
    """(Spearman rank correlation, n) of two equal-length sequences; NaN when fewer than 3 (ties take mean ranks)."""
    import pandas as pd

    x, y = pd.Series(list(predicted), dtype=float), pd.Series(list(measured), dtype=float)
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of one length; got {len(x)} and {len(y)}")
    return (float(x.rank().corr(y.rank())) if len(x) > 2 else float("nan")), len(x)


def _learner():
    from pruner.besa import Learner

    return Learner(settings={"step": OPTIMAL_STEP, "table": "operating point S", "offsets": list(OPERATING_OFFSETS),
                             "compounding": {"probes": COMPOUNDING_PROBES, "seed": COMPOUNDING_SEED,
                                             "spreads": list(COMPOUNDING_SPREADS), "terms": list(COMPOUNDING_TERMS),
                                             "damage_prices": list(COMPOUNDING_DAMAGE_PRICES),
                                             "gain_prices": list(COMPOUNDING_GAIN_PRICES)},
                             "windows": DEFAULT_WINDOWS, "window_tokens": DEFAULT_WINDOW_TOKENS,
                             "format": TABLE_FORMAT}, learn=_learn_optimal)


#: The learned-allocator entry point ``pruner.allocation`` names ("pruner.predictor:OPTIMAL_LEARNER").
OPTIMAL_LEARNER = _learner()
