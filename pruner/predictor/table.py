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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pruner.core.intervals import t_interval
from pruner.specs import StatsSpec
from pruner.store.formats import FILES_FIELD, TABLE_FORMAT, CorruptArtifact, entry_problem, file_records, stable_hash

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
        # the key it is saved under (``PredictorSpec.key``, in ``meta``) and the checksum of its arrays
        (folder / "meta.json").write_text(json.dumps({**self.meta, FILES_FIELD: file_records(folder, ["table.npz"])},
                                                     indent=1))
        if self.compounding is not None:
            save_compounding(folder, {k: v for k, v in self.compounding.items() if not k.startswith("_")})

    @classmethod
    def load(cls, folder: Path, key: str | None = None) -> "DamageTable":
        """The table saved in ``folder``; ``CorruptArtifact`` when it is truncated, altered or (``key``) another
        spec's."""
        problem = entry_problem(folder, key=key, required=("meta.json", "table.npz"))
        if problem is None and (folder / COMPOUNDING_FILE).is_file():
            problem = entry_problem(folder, required=(COMPOUNDING_FILE,))
        if problem:
            raise CorruptArtifact("damage table", folder, problem)
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


def save_compounding(folder: Path, fit: dict) -> None:
    """Write the fit beside the table atomically (a reader sees the whole file or none)."""
    import os

    tmp = folder / f".{COMPOUNDING_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(fit, indent=1))
    os.replace(tmp, folder / COMPOUNDING_FILE)


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
