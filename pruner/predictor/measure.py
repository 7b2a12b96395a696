"""Measuring on the held-out windows: the damage table itself (every block moved alone to every grid point), and
whole allocations (the compounding probes, the checks of a prediction)."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from pruner.engine.calibrate import Cancelled, ProgressFn
from pruner.predictor.compounding import COMPOUNDING_SEED, COMPOUNDING_SPREADS, probe_allocations
from pruner.predictor.table import ENERGY_STEP, HOLDOUT_SPLIT, DamageTable, PredictorSpec


def holdout_windows(tokenizer, data_dir, windows: int, window_tokens: int) -> torch.Tensor:
    """``windows`` evenly spaced, non-overlapping windows of ``window_tokens`` tokens of WikiText-2 validation:
    (windows, window_tokens)."""
    from pruner.data import wikitext2_ids
    from pruner.evaluate.perplexity import chunk_stream

    ids = wikitext2_ids(tokenizer, HOLDOUT_SPLIT, data_dir)
    chunks = chunk_stream(ids, window_tokens)
    if len(chunks) < windows:
        raise ValueError(f"WikiText-2 validation has {len(chunks)} windows of {window_tokens} tokens; asked for "
                         f"{windows}")
    return chunks[np.linspace(0, len(chunks) - 1, windows).round().astype(int)]


def head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """The next-token logits of hidden states leaving the last block (final norm, head, logit soft-capping)."""
    from pruner.evaluate.perplexity import _final_norm

    logits = model.get_output_embeddings()(_final_norm(model)(h))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def _window_nll(model, hidden: list[torch.Tensor], windows: torch.Tensor, device) -> np.ndarray:
    """Mean NLL of each window's next-token predictions from the hidden states leaving the last block."""
    from pruner.evaluate.perplexity import IGNORE, summed_nll

    out = []
    rows = [row for h in hidden for row in h]  # one (T, hidden) per window, whatever the batching
    for h, ids in zip(rows, windows):
        logits = head_logits(model, h[None])[0]
        ids = ids.to(device)
        targets = torch.cat([ids[1:], torch.full_like(ids[:1], IGNORE)])
        out.append(summed_nll(logits, targets) / (len(ids) - 1))
    return np.array(out)


class BlockRunner:
    """Token windows and what running them through a model's blocks needs: the hidden states entering block 0,
    each block's call arguments, and each layer's mask scores (``method``'s, on the dense weights). Used as a
    context: the head and final norm sit on the compute device inside it."""

    def __init__(self, model, stats, windows: torch.Tensor, method: str, device):
        from pruner.engine.besa import block_input_norms
        from pruner.engine.calibrate import capture_block_inputs
        from pruner.evaluate.perplexity import _final_norm
        from pruner.model.anatomy import find_blocks

        self.model, self.method, self.device = model, method, torch.device(device)
        self.windows = windows
        _, self.blocks = find_blocks(model)
        self.norms = block_input_norms(stats)
        if len(self.norms) != len(self.blocks):
            raise ValueError(f"the statistics have {len(self.norms)} blocks, the model {len(self.blocks)}")
        # all windows in one batch: larger matrix products, the same numbers up to float rounding
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
        from pruner.engine.calibrate import _run_block

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
        from pruner.core.scores import wanda_score

        return {n: (wanda_score(w, self.norms[b][n].to(self.device)) if self.method == "wanda" else w.abs())
                for n, w in originals.items()}


def _holdout(model, tokenizer, stats, spec: PredictorSpec, data_dir, device) -> BlockRunner:
    """The held-out windows of ``spec`` (WikiText-2 validation) ready to run through ``model``'s blocks."""
    return BlockRunner(model, stats, holdout_windows(tokenizer, data_dir, spec.windows, spec.window_tokens),
                       spec.method, device)


def _set_weights(layers, originals, scores, g: float | None) -> None:
    """Every layer of a block dense (g None: a dense-reference table's reference) or with the row-wise mask of its
    scores at sparsity g."""
    from pruner.methods.masks import lowest_mask
    from pruner.model.anatomy import weight_matrix

    for n, layer in layers.items():
        weight_matrix(layer).copy_(originals[n] if g is None else originals[n] * ~lowest_mask(scores[n], g, "row"))


def _dense_weights(layers) -> dict[str, torch.Tensor]:
    from pruner.model.anatomy import weight_matrix

    return {n: weight_matrix(layer).detach().clone() for n, layer in layers.items()}


def _restore(blocks, originals_by_block: dict[int, dict[str, torch.Tensor]]) -> None:
    from pruner.model.anatomy import prunable_layers, weight_matrix

    for b, originals in originals_by_block.items():
        for n, layer in prunable_layers(blocks[b]).items():
            weight_matrix(layer).copy_(originals[n].to(weight_matrix(layer).device))


@torch.no_grad()
def build_damage_table(model, tokenizer, stats, spec: PredictorSpec, data_dir, device="cpu",
                       progress: ProgressFn | None = None,
                       should_cancel: Callable[[], bool] | None = None) -> DamageTable:
    """Measure the table (see the module's docstring) on a dense model in memory; the model is left unchanged.
    ``stats``: the dense statistics of ``spec.stats`` (Wanda's ‖X_j‖₂). ``progress`` counts blocks."""
    from pruner.engine.calibrate import _run_block
    from pruner.model.anatomy import prunable_layers

    t0 = time.perf_counter()
    dense_weights: dict[int, dict[str, torch.Tensor]] = {}  # only with an operating point: every block's originals
    with _holdout(model, tokenizer, stats, spec, data_dir, device) as h:
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
    layer_block, names = np.asarray(stats.layer_block), list(stats.layer_names)
    allocations = [np.asarray(s, dtype=np.float64) for s in layer_sparsities]
    for s in allocations:
        if s.shape != layer_block.shape or s.min() < 0 or s.max() >= 1:
            raise ValueError(f"each allocation needs one sparsity in [0, 1) per layer ({len(layer_block)}); got "
                             f"shape {s.shape}" + (f", {s.min():.3f}…{s.max():.3f}" if s.size else ""))

    out = np.zeros((len(allocations), spec.windows))
    with _holdout(model, tokenizer, stats, spec, data_dir, device) as h:
        masks = LevelMasks(h)
        try:
            for a, s in enumerate(allocations):
                for b in range(len(h.blocks)):
                    masks.set_block(b, {n: float(v) for n, v, lb in zip(names, s, layer_block) if lb == b})
                out[a] = h.nll(h.tail(list(h.hidden), 0))
                if progress is not None:
                    progress(a + 1, len(allocations))
        finally:
            masks.restore()
    return out


class LevelMasks:
    """The prunable layers of a runner's model with their dense weights and the ranks of their mask scores, so
    that a block is set to any sparsities by one comparison per layer (``rank < prune_count`` is pruned: the
    weights ``lowest_mask`` picks, ties by position included). ``restore`` puts the dense weights back."""

    def __init__(self, runner: BlockRunner):
        from pruner.model.anatomy import prunable_layers

        self.runner, self.dense, self.ranks = runner, {}, {}
        self.dense_norms = runner.norms  # the statistics' (the dense model's): one-shot masks
        for b, block in enumerate(runner.blocks):
            block.to(runner.device)
            self.dense[b] = _dense_weights(prunable_layers(block))
            block.to(runner.home)
        self.rescore()

    def set_block(self, b: int, sparsity: float | dict[str, float]) -> None:
        """Block b's layers pruned by their one-shot masks: each at ``sparsity`` (one value, or one per layer name)."""
        from pruner.methods.masks import prune_count
        from pruner.model.anatomy import prunable_layers, weight_matrix

        block = self.runner.blocks[b]
        block.to(self.runner.device)
        for n, layer in prunable_layers(block).items():
            w = self.dense[b][n]
            s = sparsity[n] if isinstance(sparsity, dict) else sparsity
            weight_matrix(layer).copy_(w * (self.ranks[b][n] >= prune_count(w.shape[1], float(s))))
        block.to(self.runner.home)

    def use(self, norms: list[dict[str, torch.Tensor]] | None) -> None:
        """Rank the masks from these input norms from now on (None: the dense model's; the weights must be dense).
        A block whose norms are the very objects in use keeps its ranks."""
        old, self.runner.norms = self.runner.norms, self.dense_norms if norms is None else norms
        self.rescore([b for b in range(len(self.runner.blocks)) if self.runner.norms[b] is not old[b]])

    def rescore(self, blocks=None) -> None:
        """Rank the layers' scores again (of ``blocks``, default every block), from the runner's current input
        norms (the weights must be dense)."""
        for b in range(len(self.runner.blocks)) if blocks is None else blocks:
            self.ranks[b] = {n: row_ranks(score) for n, score in self.runner.scores(b, self.dense[b]).items()}

    def restore(self) -> None:
        _restore(self.runner.blocks, self.dense)


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
