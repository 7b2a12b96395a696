"""The search's fitness (``pruner.predictor.search``): KL(p_dense ‖ p_pruned) per token on calibration windows of the
model with each block pruned at its candidate level, by Wanda masks or by SparseGPT, with what a sequential prune of
the current parent gives them (Wanda's input norms ‖X_j‖₂; SparseGPT's Hessians XᵀX) so that the parent's model is
exactly the final prune's.

A child's sequential pass reuses what its parent's pass computed for the blocks before the first one the child
moved: a pass keeps the hidden states entering every e-th block (``BlockInputs``; e = ⌈B ÷
``SEARCH_INPUT_CHECKPOINTS``⌉), and the child's pass starts at the latest kept block at or before its first moved
block, with the parent's results for the blocks before that. Those blocks would have met the same inputs and been
pruned to the same levels, so the result is the pass from block 0's, bit for bit, for (B − start) / B of its work.
On SmolLM2 (30 blocks, kept every 4) a level switch's first moved block is block 6.3 on average, and a child's pass
starts at block 4.9 on average: 84% of a pass.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pruner.allocation.registry import SEARCH_MAX_SWITCHES, SEARCH_MEASURED, search_checkpoint_every
from pruner.engine.calibrate import BlockInputs, run_blockwise
from pruner.engine.prune import PruningObserver, layer_targets
from pruner.model.anatomy import is_expert_unit, weight_matrix
from pruner.predictor.measure import BlockRunner, LevelMasks, _dense_weights, _restore, head_logits

#: The methods that can prune the search's candidates (parameter ``sparsegpt``).
FITNESS_METHODS = ("wanda", "sparsegpt")


@dataclass
class SequentialFit:
    """What a sequential prune of an allocation gives the search's candidates: the allocation (units per block),
    the calibration tokens it ran on, per block what the candidates are pruned with (Wanda: the input norms,
    name → (in,); SparseGPT: (the states with their layers' names, (the level, the pruned weights))), the block
    inputs it kept for the passes of children (None once dropped), and the share of a whole pass it ran
    (1.0, or (B − start) / B when it started at a kept block)."""

    units: np.ndarray
    tokens: torch.Tensor
    blocks: list
    inputs: BlockInputs | None
    share_run: float = 1.0


class SparseGPTLevels:
    """The prunable layers of a runner's model set to any level by SparseGPT from fixed Hessians: the states (one
    per group of layers reading the same input, its factor of H⁻¹ kept) that a sequential SparseGPT prune of the
    parent computed, each pruning its layers' dense weights together (``prune_many``, in module order, as the
    final prune calls it), so that the parent's levels give exactly the final prune's weights. The parent's blocks
    are the pass's own; other levels are computed when asked, the ``keep`` most recent kept. ``restore`` puts the
    dense weights back."""

    def __init__(self, runner: BlockRunner, keep: int):
        from pruner.model.anatomy import prunable_layers

        self.runner, self.keep, self.dense = runner, keep, {}
        for b, block in enumerate(runner.blocks):
            self.dense[b] = _dense_weights(prunable_layers(block))
        self.fit = None  # per block: ([(state, [names])], (level, {name: weight}))
        self.recent: OrderedDict = OrderedDict()  # (block, level) → {name: weight}

    def use(self, fit) -> None:
        """Prune with these states from now on; ``fit``: per block (its groups, the parent's (level, weights)), as
        ``sequential_sparsegpt_fit`` returns them, or None (the weights must be dense). Blocks at other levels
        computed from a block's states are kept while the block keeps the same states (a pass that started later)."""
        kept = {k: v for k, v in self.recent.items()
                if fit is not None and self.fit is not None and fit[k[0]][0] is self.fit[k[0]][0]}
        self.fit = fit
        self.recent = OrderedDict(kept)

    def _weights(self, b: int, sparsity: float) -> dict[str, torch.Tensor]:
        if self.fit is None:
            raise RuntimeError("no SparseGPT Hessians yet: a sequential SparseGPT pass must come first")
        groups, parent = self.fit[b]
        if parent[0] == sparsity:
            return parent[1]
        if (b, sparsity) in self.recent:
            self.recent.move_to_end((b, sparsity))
            return self.recent[(b, sparsity)]
        weights = {}
        for state, names in groups:  # computed where the state's factor is, kept where the model lives
            items = [(self.dense[b][n].to(state.device).float(), sparsity, None) for n in names]
            weights.update((n, w.to(self.runner.home)) for n, (w, _) in zip(names, state.prune_many(items)))
        self.recent[(b, sparsity)] = weights
        while len(self.recent) > self.keep:
            self.recent.popitem(last=False)
        return weights

    def set_block(self, b: int, sparsity: float) -> None:
        """Block b's layers pruned by SparseGPT at ``sparsity`` (one value for the block)."""
        from pruner.model.anatomy import prunable_layers, weight_matrix

        weights = self._weights(b, sparsity)
        with torch.no_grad():
            for n, layer in prunable_layers(self.runner.blocks[b]).items():
                weight_matrix(layer).copy_(weights[n].to(weight_matrix(layer).dtype))

    def restore(self) -> None:
        _restore(self.runner.blocks, self.dense)


class KLFitness:
    """KL(p_dense ‖ p_pruned) per token, averaged over calibration windows, of the model with each block pruned at
    its candidate level: by Wanda masks (``LevelMasks``) whose input norms are the dense model's (one-shot masks)
    or, after ``use_fit``, those of a sequential Wanda prune (``sequential_fit``); or (``method`` "sparsegpt") by
    SparseGPT from the Hessians of a sequential SparseGPT prune (``SparseGPTLevels``; a ``sequential_fit`` must come
    first). Stage k scores the first ``stage_windows[k]`` windows; the dense log-probabilities of the largest stage
    are computed once. Blocks whose level did not change since the last candidate are not touched. ``restore``
    leaves the model dense."""

    def __init__(self, model, stats, windows: torch.Tensor, stage_windows: tuple[int, ...], device, step: float,
                 method: str = "wanda", batch_size: int = 4):
        if method not in FITNESS_METHODS:
            raise ValueError(f"the search's candidates are pruned by one of {', '.join(FITNESS_METHODS)}; "
                             f"got {method!r}")
        self.model, self.step, self.stats, self.device, self.batch_size = model, step, stats, device, batch_size
        self.method = method
        self.runners = [BlockRunner(model, stats, windows[:n], method, device) for n in stage_windows]
        self.masks = (SparseGPTLevels(self.runners[-1], keep=SEARCH_MEASURED * 2 * SEARCH_MAX_SWITCHES)
                      if method == "sparsegpt" else LevelMasks(self.runners[-1]))
        self.dense_logp = list(self._log_probs(self.runners[-1]))
        self.applied = np.full(len(self.runners[-1].blocks), -1)
        self._fit: SequentialFit | None = None
        self.tokens = [int(windows[:n].numel()) for n in stage_windows]

    @torch.no_grad()
    def _log_probs(self, runner: BlockRunner):
        """The next-token log-probabilities of each window, one window at a time (a generator: the caller holds
        one window's (T, vocab) at once)."""
        with runner:
            rows = [row for h in runner.tail(list(runner.hidden), 0) for row in h]
            for row in rows:
                yield torch.log_softmax(head_logits(self.model, row[None])[0].float(), dim=-1)

    def __call__(self, units: np.ndarray, stage: int) -> float:
        for b in np.flatnonzero(units != self.applied):
            self.masks.set_block(int(b), float(units[b]) * self.step)
            self.applied[b] = units[b]
        pruned = self._log_probs(self.runners[stage])  # the stage's windows: the first of the dense ones
        kl = [(p.exp() * (p - q)).sum(-1).mean() for q, p in zip(pruned, self.dense_logp)]
        return float(torch.stack(kl).mean())

    def restore(self) -> None:
        self.masks.restore()
        self.applied[:] = -1

    def sequential_fit(self, units: np.ndarray, tokens: torch.Tensor,
                       should_cancel: Callable[[], bool] | None = None) -> SequentialFit:
        """What a sequential prune of the allocation ``units`` on the calibration ``tokens`` (the final prune's:
        block b's inputs are the outputs of blocks 0 … b−1 already pruned) gives the candidates: Wanda's input norms
        ‖X_j‖₂ per block, or SparseGPT's states and the parent's weights. When the fit in use (``use_fit``) was
        computed on the same tokens and kept its block inputs, the pass starts at the latest kept block at or before
        the first block whose level differs from it (see the module's docstring). The model is dense before and
        after."""
        self.restore()
        units = np.asarray(units, dtype=np.int64)
        n_blocks = len(units)
        base, start = self.fit, 0
        if base is not None and base.inputs is not None and torch.equal(base.tokens, tokens):
            moved = np.flatnonzero(units != base.units)
            if len(moved) == 0:
                return base
            start = base.inputs.start_for(int(moved[0]))
        keep = base.inputs.before(start) if start else BlockInputs(search_checkpoint_every(n_blocks))
        block = units.astype(np.float64) * self.step
        sequential = sequential_sparsegpt_fit if self.method == "sparsegpt" else sequential_wanda_norms
        try:
            blocks = sequential(self.model, tokens, block[np.asarray(self.stats.layer_block)], self.stats,
                                self.device, self.batch_size, should_cancel, keep=keep,
                                start=(start, base.inputs.kept[start]) if start else None)
        finally:
            self.restore()
        return SequentialFit(units, tokens, (base.blocks[:start] if start else []) + blocks, keep,
                             (n_blocks - start) / n_blocks)

    @property
    def fit(self) -> SequentialFit | None:
        """The sequential fit the candidates are scored with (None: the dense model's norms, one-shot masks)."""
        return self._fit

    def use_fit(self, fit: SequentialFit | None) -> None:
        """Score every candidate from now on with this ``sequential_fit`` result (None: the dense statistics' norms
        for Wanda masks; for SparseGPT, no candidate can be scored until a fit is given)."""
        self.restore()
        self._fit = fit
        self.masks.use(None if fit is None else fit.blocks)


def _block_targets(layer_sparsity, stats) -> dict:
    """The engine's per-layer targets for a sequential pass at ``layer_sparsity`` (the statistics' layer order)."""
    return layer_targets(np.asarray(layer_sparsity, dtype=np.float64),
                         list(zip(np.asarray(stats.layer_block).tolist(), stats.layer_names)), None)


class _NormRecorder(PruningObserver):
    """The Wanda prune, keeping each layer's norms ‖X_j‖₂ before its block is pruned (``norms``, per block from the
    first block the pass ran). A class of this module, not of the function that uses it: a class defined in a
    function is in a reference cycle, and its methods' closure would keep every pass's results alive until the
    cyclic garbage collector runs."""

    def __init__(self, targets: dict, device: torch.device, dense: list[dict[str, torch.Tensor]]):
        super().__init__("wanda", targets, "row", device)
        self.dense, self.norms = dense, []

    def finish(self, index, block, layers) -> bool:
        seen = {n: self._state[n].sumsq.sqrt() for n in layers if n in self._state}
        self.norms.append({n: seen.get(n, self.dense[index][n]) for n in layers})
        return super().finish(index, block, layers)


class _HessianRecorder(PruningObserver):
    """The SparseGPT prune, keeping each block's states (only their factors of H⁻¹) with their layers' names in
    module order, and (its level, its pruned weights), in ``fitted`` (a module-level class for the reason
    ``_NormRecorder`` gives)."""

    def __init__(self, targets: dict, device: torch.device, home: torch.device):
        super().__init__("sparsegpt", targets, "row", device)
        self.home, self.fitted = home, []

    def finish(self, index, block, layers) -> bool:
        experts = [n for n in layers if is_expert_unit(n)]
        if experts:
            raise ValueError(f"the search's SparseGPT fitness is for dense blocks; block {index} has routed "
                             f"experts ({experts[0]}, …): search with Wanda masks (sparsegpt = 0)")
        found: dict[int, tuple] = {}
        for n in layers:  # module order, as ``finish`` groups them (a layer that never ran: ``finish`` says so)
            if self._state.get(n) is not None:
                found.setdefault(id(self._state[n]), (self._state[n], []))[1].append(n)
        done = super().finish(index, block, layers)
        for state, _ in found.values():
            state.keep_factor_only()
        levels = {self.targets[(index, n)].sparsity for n in layers}
        if len(levels) != 1:
            raise ValueError(f"the search gives one level per block; block {index} was given {sorted(levels)}")
        weights = {n: weight_matrix(layer).detach().to(self.home, copy=True) for n, layer in layers.items()}
        self.fitted.append((list(found.values()), (levels.pop(), weights)))
        return done


def sequential_wanda_norms(model, tokens: torch.Tensor, layer_sparsity, stats, device, batch_size: int = 4,
                           should_cancel: Callable[[], bool] | None = None, keep: BlockInputs | None = None,
                           start: tuple[int, list[torch.Tensor]] | None = None) -> list[dict[str, torch.Tensor]]:
    """Prune ``model`` in place by Wanda (row-wise) to ``layer_sparsity`` (in the statistics' layer order),
    sequentially on the calibration ``tokens``, and return the input norms ‖X_j‖₂ = √Σx_j² each layer's mask was
    computed from, per block (name → (in,) float64) from the first block the pass ran (``run_blockwise``'s
    ``keep`` and ``start``). A layer that saw no token (an expert nothing was routed to) keeps the dense statistics'
    norm."""
    from pruner.engine.besa import block_input_norms

    targets = _block_targets(layer_sparsity, stats)
    recorder = _NormRecorder(targets, torch.device(device), block_input_norms(stats))
    run_blockwise(model, tokens, recorder, device=device, batch_size=batch_size, should_cancel=should_cancel,
                  keep=keep, start=start)
    return recorder.norms


def sequential_sparsegpt_fit(model, tokens: torch.Tensor, layer_sparsity, stats, device, batch_size: int = 4,
                             should_cancel: Callable[[], bool] | None = None, keep: BlockInputs | None = None,
                             start: tuple[int, list[torch.Tensor]] | None = None) -> list[tuple]:
    """Prune ``model`` in place by SparseGPT to ``layer_sparsity`` (in the statistics' layer order, one level per
    block), sequentially on the calibration ``tokens``, and return what ``SparseGPTLevels.use`` takes, per block
    from the first block the pass ran (``run_blockwise``'s ``keep`` and ``start``): the SparseGPT states (H of the
    inputs each group of layers met; only the factor of H⁻¹ kept) with their layers' names in module order, and
    (its level, its pruned weights)."""
    targets = _block_targets(layer_sparsity, stats)
    home = next(model.parameters()).device  # where the blocks rest between their turns
    recorder = _HessianRecorder(targets, torch.device(device), home)
    run_blockwise(model, tokens, recorder, device=device, batch_size=batch_size, should_cancel=should_cancel,
                  keep=keep, start=start)
    return recorder.fitted
