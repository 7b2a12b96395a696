"""The searched allocation: an evolutionary search over per-block sparsities with the measured model as fitness,
its offspring screened by the damage table (after EvoPress: Sieberling, Kuznedelev, Kurtic, Alistarh, "EvoPress:
Accurate Dynamic Model Compression via Evolutionary Search", ICML 2025).

Search space: block b's sparsity is s_b = u_b · step (``SEARCH_STEP``, 1%) with u_b whole units within the trust
region |s_b − S| ≤ r; blocks are of equal size, so Σ_b u_b = S · B / step holds the parameter-weighted mean at
exactly S. A mutation is EvoPress's level switch: one unit up in one block, one unit down in another (1 to
``SEARCH_MAX_SWITCHES`` of them per child), so every candidate keeps the sum.

Fitness: the mean per-token KL divergence KL(p_dense ‖ p_pruned) of the next-token distributions on calibration
windows (the C4 calibration set's first windows; WikiText-2's test split is never read, nor its validation split
except by the damage table). A candidate's masks are Wanda masks from ranked scores, so any level of any block
is one comparison against the scores' ranks: no database of pruned layers. The scores' input norms ‖X_j‖₂ are
the dense model's (the cached statistics: one-shot masks, parameter ``sequential`` = 0) or (``sequential`` = 1)
those a sequential Wanda prune of the current parent meets on the whole calibration set, computed again for
every new parent (and for every seed; a child's pass starts from the hidden states its parent's pass kept at or
before the first block it moved, ``pruner.predictor.fitness``): the parent's masks are then exactly the final Wanda prune's, and a child
differs from its own final prune only in the norms downstream of the blocks it moved. The final model is the
usual sequential prune with the found allocation, by whatever method the run asks for (Wanda or SparseGPT): the
search's Wanda masks stand in for both, unless ``sparsegpt`` = 1 (with ``sequential`` = 1), where the candidates
are pruned by SparseGPT from the Hessians of the parent's sequential SparseGPT prune (``pruner.predictor.fitness``).

One generation: ``SEARCH_OFFSPRING`` children of the current best; with screening the damage table around S ranks
them and the ``SEARCH_MEASURED`` best are measured, without it (the ablation, at the same measured budget) a
random ``SEARCH_MEASURED``; stage 1 scores those (and, once, each new parent: the children's reference on the
same windows) on the first windows, the ``SEARCH_SURVIVORS`` best are scored
on more windows (stage 2, EvoPress's multi-step selection), and the best replaces the parent if it beats it there
(with ``sequential`` = 1 it is scored again under its own sequential norms first, and must still beat it).
The table's predictions of every measured child are kept beside their stage-1 fitness, and the rank correlation
between them is reported as the search runs. Seeds: the closed-form allocations at S (uniform, OWL, DLP, ATP at
their defaults) and the predictor-optimal one, each scored on stage 2; the best is the first parent.

Each generation is saved (``CacheLayout.search``): a killed or cancelled search resumes from its last saved
generation, with its random generator's state, and ends where an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from pruner.allocation.registry import SEARCH_MAX_SWITCHES, SEARCH_MEASURED, SEARCH_STAGE_TOKENS
from pruner.allocation.registry import search_stage_windows as stage_windows
from pruner.predictor.fitness import KLFitness
from pruner.predictor.optimal import block_units

#: Resolution of the searched block sparsities (EvoPress's level spacing; BESA's candidate step).
SEARCH_STEP = 0.01
#: Children proposed per generation (EvoPress's offspring count).
SEARCH_OFFSPRING = 16
#: Children scored again on the second stage's windows (EvoPress's survivors of the first selection step).
SEARCH_SURVIVORS = 2
#: The closed-form allocators whose allocations at S (default parameters) seed the search, with the
#: predictor-optimal allocation.
SEARCH_SEED_ALLOCATORS = ("uniform", "owl", "dlp", "atp")
#: Bump when the search or its checkpoint changes (part of the cache key through the learner's settings).
SEARCH_FORMAT = 2  # 2: a refitted child (sequential = 1) replaces the parent only if it still beats it


def unit_bounds(sparsity: float, reach: float, n_blocks: int,
                step: float = SEARCH_STEP) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) units of every block: s_b within [S − r, S + r] ∩ [0, 1) on the lattice. (B,) each"""
    top = int(round(1 / step)) - 1  # the largest sparsity below 1
    lo = max(0, math.ceil(round((sparsity - reach) / step, 9)))
    hi = min(top, math.floor(round((sparsity + reach) / step, 9)))
    return np.full(n_blocks, lo), np.full(n_blocks, hi)


def to_lattice(block_sparsity, total: int, lo: np.ndarray, hi: np.ndarray, step: float = SEARCH_STEP) -> np.ndarray:
    """The lattice point nearest a seed allocation with Σ u_b = ``total`` inside [lo, hi]: each block rounded down
    and kept in its bounds, then the missing units given to (or the excess taken from) the blocks whose rounding
    lost (or gained) the most. (B,) int"""
    x = np.asarray(block_sparsity, dtype=np.float64) / step
    u = np.clip(np.floor(x + 1e-9).astype(np.int64), lo, hi)
    while u.sum() < total:
        room = np.where(u < hi, x - u, -np.inf)
        u[int(np.argmax(room))] += 1
    while u.sum() > total:
        room = np.where(u > lo, x - u, np.inf)
        u[int(np.argmin(room))] -= 1
    return u


def mutate(units: np.ndarray, lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator,
           max_switches: int = SEARCH_MAX_SWITCHES) -> np.ndarray:
    """A child: 1 … ``max_switches`` level switches, each one unit up in a block below its upper bound and one
    unit down in another block above its lower bound (the sum, and so the mean, is kept)."""
    child = units.copy()
    for _ in range(int(rng.integers(1, max_switches + 1))):
        up, down = np.flatnonzero(child < hi), np.flatnonzero(child > lo)
        if len(up) == 0 or len(down) == 0:
            break
        i = int(rng.choice(up))
        down = down[down != i]
        if len(down) == 0:
            break
        child[i] += 1
        child[int(rng.choice(down))] -= 1
    return child


@dataclass
class SearchState:
    """Where a search stands: the parent (units per block) and its stage-2 fitness, the generations done, the
    random generator's state, one history row per generation, the (prediction, stage-1 fitness) pairs of every
    measured child, the seeds' fitness, the calibration tokens scored so far, and the parent's stage-1 fitness
    (``parent_first``: its KL on the windows its children are first scored on; None until measured)."""

    units: list[int]
    fitness: float
    rng: dict
    generation: int = 0
    history: list[dict] = field(default_factory=list)
    pairs: list[list[float]] = field(default_factory=list)
    seeds: dict = field(default_factory=dict)
    forward_tokens: int = 0
    parent_first: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchState":
        """The state saved by ``to_dict`` (one saved before ``parent_first`` existed measures it when it resumes)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def evolve(state: SearchState, generations: int, lo: np.ndarray, hi: np.ndarray,
           fitness: Callable[[np.ndarray, int], float], stage_tokens: tuple[int, int],
           predict: Callable[[np.ndarray], float], screen: bool = True,
           on_generation: Callable[[SearchState], None] | None = None,
           should_cancel: Callable[[], bool] | None = None,
           refit: Callable[[np.ndarray, float], tuple[float, int, bool]] | None = None) -> SearchState:
    """Run generations ``state.generation`` … ``generations`` − 1 (see the module docstring). ``fitness(units,
    stage)``: the candidate's KL on stage 0's or stage 1's windows (lower is better); ``predict(units)``: the
    table's predicted perplexity. ``on_generation`` gets the state after each generation (to save it).
    ``refit(units, parent_fitness)``, when given (the sequential fitness), is called on the child that beat the
    parent under the parent's norms: its masks' input norms are computed again for it, and it returns its stage-2
    fitness under them, the forward tokens that took, and whether it kept them (only below ``parent_fitness``; else
    the parent's norms are back). The child replaces the parent only if it kept them."""
    from pruner.engine.calibrate import Cancelled

    rng = np.random.default_rng()
    rng.bit_generator.state = state.rng
    parent = np.asarray(state.units, dtype=np.int64)
    while state.generation < generations:
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled after generation {state.generation} of {generations} (saved; it resumes there)")
        if state.parent_first is None:  # the children's reference on their own windows (once per parent)
            state.parent_first = float(fitness(parent, 0))
            state.forward_tokens += stage_tokens[0]
        children, seen = [], {tuple(parent)}
        for _ in range(SEARCH_OFFSPRING):
            child = mutate(parent, lo, hi, rng)
            if tuple(child) not in seen:
                seen.add(tuple(child))
                children.append(child)
        predicted = np.array([predict(c) for c in children])
        if screen:
            picked = np.argsort(predicted, kind="stable")[:SEARCH_MEASURED]
        else:
            picked = np.sort(rng.choice(len(children), size=min(SEARCH_MEASURED, len(children)), replace=False))
        first = np.array([fitness(children[i], 0) for i in picked])
        state.pairs += [[float(predicted[i]), float(f)] for i, f in zip(picked, first)]
        survivors = picked[np.argsort(first, kind="stable")[:SEARCH_SURVIVORS]]
        second = np.array([fitness(children[i], 1) for i in survivors])
        state.forward_tokens += len(picked) * stage_tokens[0] + len(survivors) * stage_tokens[1]
        best = int(np.argmin(second))
        replaced = refitted = bool(second[best] < state.fitness)
        if replaced and refit is None:
            parent, state.fitness = children[survivors[best]], float(second[best])
        elif replaced:  # scored again under its own norms; it must still beat the parent there
            fitness_own, tokens, replaced = refit(children[survivors[best]], state.fitness)
            state.forward_tokens += tokens
            if replaced:
                parent, state.fitness = children[survivors[best]], fitness_own
        else:
            refitted = False
        state.generation += 1
        state.units = parent.tolist()
        state.rng = rng.bit_generator.state
        state.history.append({
            "generation": state.generation, "best": state.fitness, "median": float(np.median(first)),
            "parent_first": state.parent_first,
            "proposed": len(children), "measured": len(picked), "survivors": len(survivors), "replaced": replaced,
            "refitted": refitted and refit is not None,
            "rank_correlation": _rank_correlation(state.pairs),
            "forward_tokens": state.forward_tokens})
        if replaced:  # the new parent is scored on stage 1's windows when its children are
            state.parent_first = None
        if on_generation is not None:
            on_generation(state)
    return state


def _rank_correlation(pairs: list[list[float]]) -> float | None:
    """Spearman's ρ between the table's predictions and the stage-1 fitness of every child measured so far (the
    table's rank error; None below three children)."""
    from pruner.predictor.tuning import spearman

    rho, _ = spearman([p for p, _ in pairs], [f for _, f in pairs])
    return None if math.isnan(rho) else rho


def generation_rank_correlations(history: list[dict], pairs: list[list[float]]) -> list[float | None]:
    """Spearman's ρ between the table's predictions and the stage-1 fitness *within* each generation's measured
    children (None below three). The running ρ over all children (``rank_correlation`` in the history) also
    follows the search's drift: on SmolLM2 the parent's predicted perplexity rose while its KL fell, which made that
    ρ strongly negative (−0.87 after 30 generations) while the within-generation ρ averaged −0.12."""
    out, start = [], 0
    for h in history:
        out.append(_rank_correlation(pairs[start:start + h["measured"]]))
        start += h["measured"]
    return out


def search_checkpoint(context: dict, key: str):
    """Where a search of learned-allocation ``key`` saves its generations (None without a cache folder)."""
    from pruner.store.layout import CacheLayout

    return CacheLayout.at(context.get("cache_dir")).search(key)


def _learn_search(model, tokens, sparsity, stats, params, *, device="cpu", batch_size=4, progress=None,
                  should_cancel=None, context=None, **_unused):
    """The learned-allocator protocol (``pruner.engine.besa.Learner``) for the search: the damage table around S
    (built or read, as the predictor-optimal allocation's), the seeds, the generations (resumed from the last saved
    one), the dense weights put back."""
    from pruner.allocation import allocate
    from pruner.engine.artifacts import get_stats, learned_key
    from pruner.predictor.cache import get_damage_table
    from pruner.predictor.optimal import optimal_block_sparsity
    from pruner.predictor.table import PredictorSpec
    from pruner.store.files import write_json_atomic

    if params["sparsegpt"] and not params["sequential"]:
        raise ValueError("sparsegpt = 1 prunes the candidates from the Hessians of the parent's sequential SparseGPT "
                         "prune: it needs sequential = 1")
    spec = context["spec"]
    table = get_damage_table(PredictorSpec(spec, around=sparsity), context.get("cache_dir"),
                             data_dir=spec.calib.data_dir, loaded=context.get("loaded"), progress=progress,
                             should_cancel=should_cancel)
    if stats is None:
        stats = get_stats(spec, context.get("cache_dir"), loaded=context.get("loaded"))
    numel = np.asarray(table.block_numel, dtype=np.float64)
    if not np.allclose(numel, numel[0]):
        raise ValueError("the search needs blocks of equal size (the mean of its block sparsities is then S)")
    B, reach, generations = table.n_blocks, params["reach"], params["generations"]
    total = block_units(sparsity, B)
    lo, hi = unit_bounds(sparsity, reach, B)
    if not lo.sum() <= total <= hi.sum():
        raise ValueError(f"no allocation of mean S = {sparsity:g} lies within ±{reach:g} of it on the 1% lattice")
    points = table.points()
    if lo[0] * SEARCH_STEP < points[0] - 1e-9 or hi[0] * SEARCH_STEP > points[-1] + 1e-9:
        allowed = min(sparsity - points[0], points[-1] - sparsity)
        raise ValueError(f"r = {reach:g} reaches beyond the damage table around S = {sparsity:g}, which measured "
                         f"{points[0]:g} … {points[-1]:g}: choose r ≤ {allowed:.2f}")
    windows = stage_windows(tokens.shape[0], tokens.shape[1])
    key = learned_key(spec, "search", sparsity, params)
    path = search_checkpoint(context, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fitness = KLFitness(model, stats, tokens[:windows[-1]], windows, device, SEARCH_STEP,
                        "sparsegpt" if params["sparsegpt"] else "wanda", batch_size=batch_size)

    def refit_sequential(units: np.ndarray, below: float = math.inf) -> tuple[float, int, bool]:
        previous = fitness.fit
        fit = fitness.sequential_fit(units, tokens, should_cancel)  # from the parent's kept inputs where it can
        fitness.use_fit(fit)
        f = fitness(units, 1)
        if not f < below:
            fitness.use_fit(previous)  # the parent's norms (or states) again: no calibration pass
        # the pass's tokens in whole-model passes: one that started at block b of B ran (B − b) / B of one
        return f, round(tokens.numel() * fit.share_run) + fitness.tokens[1], f < below

    refit = refit_sequential if params["sequential"] else None
    try:
        saved = read_checkpoint(path, key)
        if saved is not None:
            state, resumed = SearchState.from_dict(saved["state"]), saved["state"]["generation"]
            if progress is not None:  # shown before the saved parent's calibration pass below (minutes on a real model)
                progress(resumed, generations)
            if refit is not None:  # the saved parent's fitness was measured under its own sequential norms
                fitness.use_fit(fitness.sequential_fit(np.asarray(state.units), tokens, should_cancel))
        else:
            state, resumed = _seeded_state(stats, table, sparsity, reach, total, lo, hi, fitness, spec.calib.seed,
                                           allocate, optimal_block_sparsity, refit, progress), None

        def save(s: SearchState) -> None:
            write_json_atomic(path, {"key": key, "format": SEARCH_FORMAT, "sparsity": sparsity, "params": params,
                                     "generations": generations, "state": s.to_dict()})
            if progress is not None:
                progress(s.generation, generations)

        save(state)
        state = evolve(state, generations, lo, hi, fitness, tuple(fitness.tokens),
                       lambda u: table.predict(u * SEARCH_STEP).perplexity, screen=bool(params["screen"]),
                       on_generation=save, should_cancel=should_cancel, refit=refit)
    finally:
        fitness.restore()
    block = np.asarray(state.units) * SEARCH_STEP
    layer_block = np.asarray(stats.layer_block)
    return {"layer_names": list(stats.layer_names), "layer_block": layer_block.tolist(),
            "layer_sparsity": [float(v) for v in block[layer_block]], "block_sparsity": block.tolist(),
            "units": state.units, "fitness": state.fitness, "seeds": state.seeds, "history": state.history,
            "pairs": state.pairs,
            "forward_tokens": state.forward_tokens, "stage_tokens": fitness.tokens, "resumed_from": resumed,
            "search_seconds": round(time.perf_counter() - t0, 2), "predictor": table.meta.get("key"),
            "predicted_perplexity": table.predict(block).perplexity}, stats


def _seeded_state(stats, table, sparsity, reach, total, lo, hi, fitness, seed, allocate, optimal,
                  refit=None, progress=None) -> SearchState:
    """The first parent: the best of the seed allocations on stage 2 (each put on the lattice within the bounds;
    with ``refit``, each scored under its own sequential norms, and the chosen one's norms left in use).
    ``progress`` counts the seeds scored (with ``refit`` each takes a calibration pass)."""
    candidates = {name: allocate(name, stats, sparsity).block_sparsity for name in SEARCH_SEED_ALLOCATORS}
    candidates["predicted"] = optimal(table, sparsity, reach=reach)
    seeds, best, tokens = {}, None, 0
    if progress is not None:  # before the first seed's score (with ``refit``, minutes on a real model)
        progress(0, len(candidates))
    for name, block in candidates.items():
        units = to_lattice(block, total, lo, hi)
        if refit is None:
            f, used = fitness(units, 1), fitness.tokens[1]
        else:
            (f, used, _), norms = refit(units), fitness.fit
            if best is not None and not f < best[1]:
                norms.inputs = None  # not the first parent: its kept inputs are dropped (two passes' at most)
        tokens += used
        moved = float(np.abs(units * SEARCH_STEP - np.asarray(block)).max())
        seeds[name] = {"fitness": f, "largest_move_to_lattice": round(moved, 6), "forward_tokens": used}
        if best is None or f < best[1]:
            best = (units, f, name, None if refit is None else norms)
        if progress is not None:
            progress(len(seeds), len(candidates))
    seeds["chosen"] = best[2]
    if refit is not None:
        fitness.use_fit(best[3])
    rng = np.random.default_rng(seed)
    return SearchState(units=best[0].tolist(), fitness=best[1], rng=rng.bit_generator.state, seeds=seeds,
                       forward_tokens=tokens)


def _learner():
    from pruner.engine.besa import Learner

    return Learner(settings={"step": SEARCH_STEP, "offspring": SEARCH_OFFSPRING, "measured": SEARCH_MEASURED,
                             "survivors": SEARCH_SURVIVORS, "max_switches": SEARCH_MAX_SWITCHES,
                             "stage_tokens": list(SEARCH_STAGE_TOKENS), "seeds": list(SEARCH_SEED_ALLOCATORS),
                             "fitness": "KL(dense || pruned) on calibration windows, Wanda masks",
                             "format": SEARCH_FORMAT}, learn=_learn_search)


#: The learned-allocator entry point ``pruner.allocation`` names ("pruner.predictor.search:SEARCH_LEARNER").
SEARCH_LEARNER = _learner()


def saved_search(spec, sparsity: float, params: dict, cache_dir=None) -> dict | None:
    """The last saved generation of the search with these settings (``key``, ``generations``, ``state``: a
    ``SearchState`` as a dict), or None when none was saved or it cannot be read."""
    from pruner.allocation import ALLOCATORS
    from pruner.engine.artifacts import learned_key
    from pruner.store.layout import CacheLayout

    params = ALLOCATORS["search"].check(params)
    key = learned_key(spec, "search", sparsity, params)
    return read_checkpoint(CacheLayout.at(cache_dir).search(key), key)


def saved_searches(spec, sparsity: float, cache_dir=None) -> list[dict]:
    """Every search on this model and calibration set at S = ``sparsity`` with a saved generation (running, or
    stopped and waiting to resume), whatever its parameters: the checkpoints (``saved_search``'s dicts)."""
    from pruner.allocation import ALLOCATORS
    from pruner.engine.artifacts import learned_key
    from pruner.store.layout import CacheLayout

    found = []
    for path in sorted((CacheLayout.at(cache_dir).root / "searches").glob("*.json")):
        saved = read_checkpoint(path, path.stem)
        try:
            ours = (saved is not None and saved["sparsity"] == sparsity
                    and learned_key(spec, "search", sparsity, ALLOCATORS["search"].check(saved["params"])) == path.stem)
        except (ValueError, KeyError, TypeError, AttributeError):  # a checkpoint of another shape: not shown
            continue
        if ours:
            found.append(saved)
    return found


def read_checkpoint(path, key: str) -> dict | None:
    """A search's saved generation at ``path`` when it is readable, of this format and for ``key``; else None (no
    file, a damaged one, or another search's: the search then starts from its seeds, and is deterministic, so it
    ends where the lost one would have)."""
    import json

    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(saved, dict) and saved.get("format") == SEARCH_FORMAT and saved.get("key") == key
    return saved if ok else None
