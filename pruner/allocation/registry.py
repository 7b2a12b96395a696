"""The allocator registry (what each allocator reads, its parameters, its function) and ``allocate``, which turns
any allocator's output into per-layer and per-block sparsities. Learned allocators name their learner as
"module:object" and the registry resolves it (``Allocator.resolve_learner``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from pruner.allocation.formulas import (_ROUNDOFF, ALPHA_EPSILON_FRACTION, ATP_DEFAULT_DELTA, BESA_DEFAULT_BETA,
                                        DLP_DEFAULT_ALPHA, OWL_DEFAULT_LAMBDA, OWL_DEFAULT_M, alpha_pruning, atp,
                                        check_sparsity, dlp, er, global_threshold, owl, owl_inverse, to_parameter_mean,
                                        uniform)
from pruner.core.params import Param, check_params

#: What an allocator reads (``Allocator.needs``), from cheapest to dearest. Pruning computes only what the chosen
#: allocator needs: the layout is read off the model; the weights' spectra need no calibration data; the dense
#: model's statistics are a full calibration pass over every block *before* any block is pruned, because these
#: allocators normalise over all blocks at once (OWL's min–max scaling of the LOD, the global threshold's one
#: cut across all layers), so block 0's sparsity depends on the last block's scores.
NEEDS_LAYOUT = "layout"  # layer names, blocks and shapes
NEEDS_WEIGHTS = "weights"  # the layout plus per-layer quantities of the dense weights alone (PL_Alpha_Hill)
NEEDS_STATISTICS = "statistics"  # the dense model's calibration statistics (input norms, Wanda-score summaries)
NEEDS = (NEEDS_LAYOUT, NEEDS_WEIGHTS, NEEDS_STATISTICS)


# ---------------------------------------------------------------------------------------------------------------
# Registry: a uniform interface over the formulas above, fed by cached statistics.


def _block_numel(x) -> np.ndarray:
    shapes = np.asarray(x.layer_shapes, dtype=np.float64)
    return np.bincount(np.asarray(x.layer_block), weights=shapes[:, 0] * shapes[:, 1], minlength=x.n_blocks)


def _block_mean(values, layer_block, n_blocks) -> np.ndarray:
    layer_block = np.asarray(layer_block)
    return np.bincount(layer_block, weights=values, minlength=n_blocks) / np.bincount(layer_block, minlength=n_blocks)


class AllocationInputs(Protocol):
    """What allocators read (``pruner.engine.stats.Stats`` provides it)."""

    layer_block: np.ndarray  # (L,) block index of each layer
    layer_shapes: np.ndarray  # (L, 2) (out_features, in_features)
    score_hist: np.ndarray  # (L, H) Wanda-score histogram
    layer_alpha: np.ndarray  # (L,) PL_Alpha_Hill per layer
    block_mean_score: np.ndarray  # (B,) mean Wanda score per block (statistics only)

    @property
    def n_blocks(self) -> int: ...

    def lod(self, m: float) -> np.ndarray: ...


#: The allocators' declared parameters (``pruner.core.params``); a sparsity interval [0, 1) spans at most 2λ < 1.
LAMBDA = Param("lam", "λ", float, OWL_DEFAULT_LAMBDA, "OWL's spread: block sparsities span 2λ around S",
               low=0.0, high=0.5, high_open=True, step=0.01, slider=(0.0, 0.49))
#: M's range is that of the statistics' exact grid (``pruner.engine.stats.M_GRID``: 0.01 … ≈9976).
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
                      "predictor-optimal and search: the largest |s_b − S| the dynamic programme or the search may "
                      "give a block", low=0.0, high=1.0, low_open=True, step=0.01, slider=(0.01, 0.3))
#: The search's length: each generation measures ``pruner.predictor.search.SEARCH_MEASURED`` children for real.
SEARCH_GENERATIONS = Param("generations", "G", int, 40, "search: generations of offspring (each measures a few "
                           "children on calibration text)", low=1, high=100_000, step=10)
#: Calibration tokens each selection stage of the search scores (whole calibration windows, at most the calibration
#: set): here, below the search itself, because the memory plan reads it too.
SEARCH_STAGE_TOKENS = (512, 2048)
#: Children measured per generation: the table's best few (screened) or a random few (unscreened).
SEARCH_MEASURED = 4
#: Level switches per child: 1 … this many, drawn uniformly.
SEARCH_MAX_SWITCHES = 3


#: Blocks whose entering hidden states a sequential pass of the search keeps for the passes of children
#: (``pruner.predictor.fitness``): blocks 0, e, 2e, … with e = ⌈B ÷ this⌉ (8 of SmolLM2's 30 blocks: 0, 4, …, 28;
#: each is the calibration set's activations, 38 MB there). Here, below the search, because the memory plan reads it.
SEARCH_INPUT_CHECKPOINTS = 8
#: Passes whose kept inputs the search holds at once: the parent's and the child's being computed (while the seeds
#: are scored: the best seed's and the next one's).
SEARCH_KEPT_INPUT_SETS = 2


def search_checkpoint_every(n_blocks: int) -> int:
    """Every how many blocks a sequential pass of the search keeps the hidden states entering the block."""
    return -(-n_blocks // SEARCH_INPUT_CHECKPOINTS)


def search_stage_windows(n_windows: int, seqlen: int, stage_tokens=SEARCH_STAGE_TOKENS) -> tuple[int, ...]:
    """Calibration windows per search stage: enough for each stage's tokens, at most the calibration set, at least
    one."""
    return tuple(max(1, min(n_windows, -(-t // seqlen))) for t in stage_tokens)

#: Screening on (1: the damage table picks which children are measured) or off (0: as many, picked at random). Off
#: by default: on SmolLM2 at 70% the table did not rank children one to three 1% switches apart (Spearman's ρ within
#: a generation −0.12), and the unscreened search reached a lower KL (2.306 vs 2.359 after 30 generations) and lower
#: perplexities with Wanda and SparseGPT (docs/results.md, "The searched allocation").
SEARCH_SCREEN = Param("screen", "screened", int, 0, "search: 1 lets the damage table pick which children are "
                      "measured, 0 picks them at random (better on SmolLM2 at S = 0.7)", low=0, high=1, step=1)
#: Which input norms ‖X_j‖₂ the search's Wanda masks use. 0: the dense model's (one-shot masks, the statistics'
#: norms): cheap, but the final prune is sequential (block b's norms come from the output of the pruned blocks
#: before it), so the searched model is not the model the run ends with. 1: the norms of a sequential Wanda prune
#: of the current parent on the whole calibration set, computed again whenever the parent changes: the parent's
#: masks are then exactly the final Wanda prune's, and its children differ from it only downstream of the blocks
#: they moved. One sequential pass per change of parent (a Wanda prune's time).
SEARCH_SEQUENTIAL = Param("sequential", "sequential", int, 0, "search: 1 scores children with the input norms of the "
                          "parent's sequential Wanda prune (its masks are then the final prune's), 0 with the dense "
                          "model's norms (one-shot masks)", low=0, high=1, step=1)
#: Which method prunes the search's candidates (with ``sequential`` = 1 only). 0: Wanda masks. 1: SparseGPT: each
#: block at its candidate level is pruned by SparseGPT (weights updated) from the Hessians XᵀX of the parent's
#: sequential SparseGPT prune, so the parent's model is exactly the final SparseGPT prune's and a child differs from
#: its own only downstream of the blocks it moved — the allocation best for Wanda's final model need not be for
#: SparseGPT's (docs/results.md, "The search's fitness on the final model").
SEARCH_SPARSEGPT = Param("sparsegpt", "SparseGPT", int, 0, "search: 1 prunes the candidates by SparseGPT from the "
                         "Hessians of the parent's sequential SparseGPT prune (needs sequential = 1), 0 by Wanda "
                         "masks", low=0, high=1, step=1)


@dataclass(frozen=True)
class Allocator:
    """A registry entry. ``compute(inputs, S, **params)`` returns the (L,) per-layer sparsities from what
    ``needs`` names; ``params`` declares its parameters. A learned allocator has no formula: ``learner`` names the
    function (``"module:function"``, imported only when used) that learns its per-layer sparsities through the
    model, run as a request of its own (``pruner.jobs.workflows.LearnRequest``)."""

    name: str
    label: str
    granularity: str  # "block" (one sparsity per block) or "layer"
    compute: Callable[..., np.ndarray]
    description: str
    params: tuple[Param, ...] = ()
    #: What ``compute`` reads: one of ``NEEDS`` (a learned allocator: what its learning reads).
    needs: str = NEEDS_STATISTICS
    learner: str | None = None
    #: Parameters declared after results with this allocator were stored: left out of cache keys while at their
    #: default (``keyed``), so those results keep their keys.
    late_params: tuple[str, ...] = ()

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise ValueError(f"allocator {self.name!r}: needs must be one of {', '.join(NEEDS)}; got {self.needs!r}")

    @property
    def learned(self) -> bool:
        return self.learner is not None

    def resolve_learner(self):
        """The object ``learner`` names ("module:object", e.g. ``pruner.engine.besa:BESA_LEARNER``), imported only
        now: the learners run models, far above this registry, which must not import them."""
        if not self.learned:
            raise ValueError(f"allocator {self.name!r} is computed from its inputs, not learned")
        module, _, name = self.learner.partition(":")
        return getattr(importlib.import_module(module), name)

    def check(self, params: dict | None) -> dict:
        """Its parameters checked, defaults filled in (ValueError names the allowed range)."""
        return check_params(f"allocator {self.name!r}", self.params, params)

    def keyed(self, params: dict | None) -> dict:
        """Its checked parameters as cache keys hold them: a ``late_params`` entry only when not at its default."""
        checked = self.check(params)
        defaults = {p.name: p.default for p in self.params}
        return {k: v for k, v in checked.items() if not (k in self.late_params and v == defaults[k])}

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
                     "from the statistics: learn them with pruner.engine.artifacts.learn_allocation (CLI: `allocate "
                     "--allocator NAME`) and pass them as learned=")


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
              params=(BETA,), learner="pruner.engine.besa:BESA_LEARNER"),
    Allocator("predicted", "Predictor-optimal", "block", _learned_elsewhere,
              "per-block sparsities minimising the perplexity predictor's loss at mean S (dynamic programme over "
              "its damage table), each within ±r of S", params=(OPTIMAL_REACH,),
              learner="pruner.predictor.optimal:OPTIMAL_LEARNER"),
    Allocator("search", "Search (evolutionary)", "block", _learned_elsewhere,
              "per-block sparsities found by an evolutionary search on the KL divergence from the dense model on "
              "calibration text (EvoPress), children screened by the damage table; each within ±r of S",
              params=(OPTIMAL_REACH, SEARCH_GENERATIONS, SEARCH_SCREEN, SEARCH_SEQUENTIAL, SEARCH_SPARSEGPT),
              learner="pruner.predictor.search:SEARCH_LEARNER", late_params=("sparsegpt",)),
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


