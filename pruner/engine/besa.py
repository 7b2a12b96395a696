"""BESA-style learned layer sparsities (Xu et al., ICLR 2024: "BESA: Pruning Large Language Models with Blockwise
Parameter-Efficient Sparsity Allocation").

Per transformer block, every linear layer l gets learnable probabilities p_l over candidate sparsities
s_k = k · step (k = 0 … K − 1, step 0.01, so 0 … 0.99). Its weights are ranked by the Wanda score |W_ij|·‖X_j‖₂
within each output row; candidate k prunes the c_k = round(s_k · n_in) lowest of every row. A weight of rank r
(0 = lowest score) is kept by every candidate with c_k ≤ r, so its *expected* keep-mask is

    M_ij = Σ_{k : c_k ≤ r_ij} p_k = cumsum(p)[idx(r_ij)],

differentiable in p = softmax(logits). The layer's expected sparsity is ŝ_l = Σ_k p_k c_k / n_in and the
block's is ŝ = Σ_l n_l ŝ_l / Σ_l n_l (n_l: the layer's weight count). The logits minimise

    loss = E + β · ((ŝ − S) / S)²,

where E is the block's reconstruction error with the expected masks against the dense block on the same
calibration inputs, *relative to the dense block's own contribution*: E = ‖Ŷ − Y‖² / ‖Y − X‖² (X the block's
input, Y its dense output, Ŷ the output with W ⊙ M). BESA's raw MSE grows by orders of magnitude with depth
(the residual stream's norm grows), so one β would mean a different trade-off in every block; the relative
error makes β comparable across blocks and models.

After training, each layer's sparsity is its expected ŝ_l, and the block's layers are shifted by one common
amount so that the block's parameter-weighted mean is exactly S (the penalty only gets close); the shift and the
block's learned ŝ before it are reported. A shift that would leave [0, 1) is an error, never a clamp.

What differs from the paper, deliberately: the sparsities are learned on the *dense* model's block inputs (one
cacheable allocation per model, calibration set and S, usable with every pruning method), while BESA learns
them sequentially on the already pruned model and prunes with the learned masks directly. Here the chosen
method then prunes to these sparsities in the usual sequential pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from pruner.allocation import BESA_DEFAULT_BETA, BETA
from pruner.core.scores import wanda_score
from pruner.engine.calibrate import ProgressFn, run_blockwise
from pruner.methods.masks import prune_count
from pruner.model.anatomy import parameter_overrides, weight_matrix

#: Spacing of the candidate sparsities (the paper's 1%).
BESA_STEP = 0.01
#: Passes over the calibration mini-batches per block (one optimiser step per mini-batch).
BESA_DEFAULT_EPOCHS = 4
#: Adam's learning rate on the candidate logits (0.05 moved SmolLM2's first blocks about half as far in 4 epochs
#: and left a larger error).
BESA_DEFAULT_LR = 0.2
#: Width (in sparsity units) of the initial distribution over candidates: a discretised Gaussian centred on S,
#: so that training starts at the target, as uniform allocation does.
BESA_INIT_WIDTH = 0.05
#: Expected keep-probabilities below this are set to exactly 0. Such a weight is pruned by every candidate that
#: carries any weight; the values matter only for speed: products of weights with probabilities near 1e-40 are
#: subnormal floats, and a block forward with them ran 27× slower on this CPU (flush-to-zero is per thread and
#: does not reach the matmul's worker threads).
KEEP_FLOOR = 1e-12
#: Bump when the learning procedure changes (part of the cache key).
BESA_FORMAT_VERSION = 1


def candidate_sparsities(step: float = BESA_STEP) -> torch.Tensor:
    """s_k = k · step for k = 0 … K − 1 with K = round(1 / step): (K,) float64 in [0, 1)."""
    if not (0 < step < 1) or abs(1 / step - round(1 / step)) > 1e-9:
        raise ValueError(f"the candidate step must divide 1 (e.g. 0.01, 0.05); got {step!r}")
    return torch.arange(round(1 / step), dtype=torch.float64) * step


def prune_counts(n_in: int, candidates: torch.Tensor) -> torch.Tensor:
    """c_k: how many weights of a row of ``n_in`` each candidate prunes (the same rounding as the pruning methods)."""
    return torch.tensor([prune_count(n_in, float(s)) for s in candidates], dtype=torch.long)


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """r: each weight's rank within its row by score, 0 = lowest; ties broken by position, as the methods' stable
    sort does. scores (out, in) → (out, in) long."""
    order = torch.argsort(scores.contiguous(), dim=1, stable=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order).contiguous()
    return torch.empty_like(order).scatter_(1, order, positions)


def rank_buckets(ranks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """idx(r) = max{k : c_k ≤ r}, the last candidate that still keeps a weight of rank r (c_k is nondecreasing and
    c_0 = 0 ≤ r, so it exists). ranks (out, in) → (out, in) long."""
    return torch.searchsorted(counts, ranks, right=True) - 1


def expected_keep(logits: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """M = cumsum(softmax(logits))[idx]: each weight's probability of being kept, with values below KEEP_FLOOR
    set to 0. (K,), (out, in) → (out, in)."""
    keep = torch.cumsum(torch.softmax(logits, dim=0), dim=0)
    return (keep * (keep >= KEEP_FLOOR))[buckets]


def expected_sparsity(logits: torch.Tensor, counts: torch.Tensor, n_in: int) -> torch.Tensor:
    """ŝ_l = Σ_k p_k c_k / n_in, the layer's expected share of pruned weights (a scalar tensor)."""
    return (torch.softmax(logits, dim=0) * counts.to(logits.dtype)).sum() / n_in


def initial_logits(target: float, candidates: torch.Tensor, width: float = BESA_INIT_WIDTH) -> torch.Tensor:
    """Logits of a discretised Gaussian over the candidates centred on S (float32, (K,))."""
    return (-0.5 * ((candidates - target) / width) ** 2).float()


def shift_to_target(layer_sparsity: np.ndarray, numel: np.ndarray, target: float) -> tuple[np.ndarray, float]:
    """Add one δ to every layer so that Σ n_l s_l / Σ n_l = S exactly; return (shifted, δ).

    Raises ValueError when a shifted sparsity would leave [0, 1) (no clamping)."""
    s = np.asarray(layer_sparsity, dtype=np.float64)
    n = np.asarray(numel, dtype=np.float64)
    delta = float(target - (s * n).sum() / n.sum())
    out = s + delta
    if out.min() < 0 or out.max() >= 1:
        raise ValueError(f"BESA's learned sparsities cannot be shifted to mean S = {target:g} inside [0, 1) "
                         f"(range after the shift {out.min():.3f}…{out.max():.3f}); raise β so the penalty holds "
                         f"the block nearer S")
    return out, delta


@dataclass
class BlockResult:
    layer_names: list[str]
    learned: np.ndarray  # (layers,) expected ŝ_l after training, before the shift
    sparsity: np.ndarray  # (layers,) after the shift: parameter-weighted mean exactly S
    shift: float  # δ added to every layer
    error_first: float  # mean relative reconstruction error E (expected masks) over the first epoch
    error_last: float  # … and over the last epoch
    steps: int
    numel: np.ndarray  # (layers,) weights per layer
    error_hard: float  # E with hard Wanda masks (per row) at the final sparsities
    error_uniform: float  # E with hard Wanda masks at S in every layer: what uniform allocation gets here


def learn_block(block: nn.Module, layers: dict[str, nn.Module], input_norms: dict[str, torch.Tensor],
                batches: list[tuple[torch.Tensor, tuple, dict, torch.Tensor]], target: float, *,
                beta: float = BESA_DEFAULT_BETA, epochs: int = BESA_DEFAULT_EPOCHS, lr: float = BESA_DEFAULT_LR,
                step: float = BESA_STEP) -> BlockResult:
    """Learn the sparsities of one block's ``layers``.

    input_norms: layer name → ‖X_j‖₂ over the calibration tokens, (in,). batches: (X (b, T, d), the block's other
    positional arguments, its keyword arguments, the dense output Y (b, T, d)) per calibration mini-batch; X and Y
    may be in CPU memory (offloaded activations): each goes to the block's device for its step.
    """
    from torch.func import functional_call

    candidates = candidate_sparsities(step)
    names = list(layers)
    weights, ranks, buckets, counts, logits, numel = {}, {}, {}, {}, {}, []
    for name in names:
        w = weight_matrix(layers[name]).detach().float()  # on the block's (compute) device
        counts[name] = prune_counts(w.shape[1], candidates).to(w.device)
        ranks[name] = row_ranks(wanda_score(w, input_norms[name].to(w.device)))
        buckets[name] = rank_buckets(ranks[name], counts[name])
        weights[name] = w
        logits[name] = initial_logits(target, candidates).to(w.device).requires_grad_(True)
        numel.append(w.numel())
    device = weights[names[0]].device
    numel_t = torch.tensor(numel, dtype=torch.float32, device=device)
    optimiser = torch.optim.Adam(list(logits.values()), lr=lr)
    # ‖Y − X‖² per mini-batch: the dense block's own contribution, the scale of its reconstruction error
    scales = [float(((y.float() - x.float()) ** 2).sum()) for x, _, _, y in batches]
    losses = []
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:  # gradients flow to the logits only; the block's own parameters get no .grad
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for (x, args, kwargs, y), scale in zip(batches, scales):
                    x, y = x.to(device), y.to(device)
                    params = parameter_overrides(layers, {n: weights[n] * expected_keep(logits[n], buckets[n])
                                                          for n in names})
                    out = functional_call(block, params, (x, *args), kwargs)
                    out = out if isinstance(out, torch.Tensor) else out[0]
                    error = ((out.float() - y.float()) ** 2).sum() / scale
                    s_layers = torch.stack([expected_sparsity(logits[n], counts[n], weights[n].shape[1]) for n in names])
                    s_block = (s_layers.float() * numel_t).sum() / numel_t.sum()
                    loss = error + beta * ((s_block - target) / target) ** 2
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    losses.append(error.item())
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    with torch.no_grad():
        learned = np.array([float(expected_sparsity(logits[n], counts[n], weights[n].shape[1])) for n in names])
    shifted, delta = shift_to_target(learned, np.array(numel), target)
    per_epoch = len(batches)

    def hard_error(sparsities) -> float:
        masked = parameter_overrides(layers, {n: weights[n] * (ranks[n] >= prune_count(weights[n].shape[1], s))
                                              for n, s in zip(names, sparsities)})
        with torch.no_grad():
            errors = []
            for (x, args, kwargs, y), scale in zip(batches, scales):
                out = functional_call(block, masked, (x.to(device), *args), kwargs)
                out = out if isinstance(out, torch.Tensor) else out[0]
                errors.append(float(((out.float() - y.to(device).float()) ** 2).sum()) / scale)
        return float(np.mean(errors))

    return BlockResult(names, learned, shifted, delta, float(np.mean(losses[:per_epoch])),
                       float(np.mean(losses[-per_epoch:])), len(losses), np.array(numel), hard_error(shifted),
                       hard_error([target] * len(names)))


def block_input_norms(stats) -> list[dict[str, torch.Tensor]]:
    """‖X_j‖₂ of every prunable layer, per block (name → (in,)), from the dense model's cached statistics: the same
    calibration inputs BESA learns on, so the Wanda ranking is not accumulated a second time."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(stats.n_blocks)]
    for block, name, norm in zip(np.asarray(stats.layer_block).tolist(), stats.layer_names, stats.input_norms):
        out[block][name] = torch.as_tensor(norm)
    return out


@dataclass
class BesaObserver:
    """A ``BlockObserver`` that learns each block's layer sparsities from the dense block's inputs and outputs and
    leaves the weights as they are (so the next block sees dense inputs).

    input_norms: per block, layer name → ‖X_j‖₂ on the same calibration set (``block_input_norms(stats)``).
    offload: keep the recorded block inputs and outputs in CPU memory (as the loop's offloaded activations)."""

    target: float
    input_norms: list[dict[str, torch.Tensor]]
    beta: float = BESA_DEFAULT_BETA
    epochs: int = BESA_DEFAULT_EPOCHS
    lr: float = BESA_DEFAULT_LR
    offload: bool = False
    results: list[BlockResult] = field(default_factory=list)

    def attach(self, index, block, layers):
        # input norms of a block may be supplied only at its finish (``StatsAndBesaObserver``)
        if index < len(self.input_norms) and set(self.input_norms[index]) != set(layers):
            raise ValueError(f"block {index}: the statistics' layers {sorted(self.input_norms[index])} are not this "
                             f"model's {sorted(layers)}")
        self._batches = []

        def record_block(module, args, kwargs, output):
            x, rest = (args[0], args[1:]) if args else (kwargs["hidden_states"], ())
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            y = output if isinstance(output, torch.Tensor) else output[0]
            keep = (lambda t: t.detach().to("cpu")) if self.offload else (lambda t: t.detach())
            self._batches.append((keep(x), rest, kw, keep(y)))

        return [block.register_forward_hook(record_block, with_kwargs=True)]

    def finish(self, index, block, layers) -> bool:
        self.results.append(learn_block(block, layers, self.input_norms[index], self._batches, self.target,
                                        beta=self.beta, epochs=self.epochs, lr=self.lr))
        self._batches = []
        return False


def check_besa_params(beta: float, epochs: int, lr: float) -> None:
    BETA.check(beta)
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"BESA epochs must be an integer ≥ 1; got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"BESA's learning rate must be > 0; got {lr!r}")


class StatsAndBesaObserver:
    """One dense pass that collects the statistics (``pruner.engine.stats.StatsCollector``) and learns BESA's sparsities
    from them block by block: both read only the dense model's block inputs, and BESA needs block b's ‖X_j‖₂ only
    when it learns block b, so a separate statistics pass is not needed. The statistics are exactly those of a
    separate pass (the same hooks on the same forward)."""

    def __init__(self, besa: BesaObserver):
        from pruner.engine.stats import StatsCollector

        self.collector = StatsCollector()
        self.besa = besa

    def attach(self, index, block, layers):
        return self.collector.attach(index, block, layers) + self.besa.attach(index, block, layers)

    def finish(self, index, block, layers) -> bool:
        self.collector.finish(index, block, layers)
        summaries = self.collector.summaries[-len(layers):]
        self.besa.input_norms.append({name: torch.as_tensor(s.input_norm) for name, s in zip(layers, summaries)})
        return self.besa.finish(index, block, layers)


def learn_sparsities(model: nn.Module, tokens: torch.Tensor, target: float, stats=None, *,
                     beta: float = BESA_DEFAULT_BETA, epochs: int = BESA_DEFAULT_EPOCHS, lr: float = BESA_DEFAULT_LR,
                     device="cpu", batch_size: int = 4, progress: ProgressFn | None = None,
                     should_cancel: Callable[[], bool] | None = None, blocks=None, offload: bool = False):
    """Learn every block's layer sparsities through the one calibration loop (the model is not modified).

    ``stats``: the dense model's ``Stats`` on the same calibration tokens (for the Wanda ranking's ‖X_j‖₂); None:
    the same pass collects them. ``blocks``, ``offload``: where the blocks' weights come from (streamed: read from
    the checkpoint for their turn) and whether activations live in CPU memory (``pruner.engine.calibrate.run_blockwise``).
    Returns (per-block results, the statistics used)."""
    if not (0 < target < 1):
        raise ValueError(f"target sparsity S must be in (0, 1); got {target!r}")
    check_besa_params(beta, epochs, lr)
    besa = BesaObserver(target, block_input_norms(stats) if stats is not None else [], beta, epochs, lr, offload)
    observer = besa if stats is not None else StatsAndBesaObserver(besa)
    t0 = time.perf_counter()
    run_blockwise(model, tokens, observer, device=device, batch_size=batch_size, progress=progress,
                  should_cancel=should_cancel, blocks=blocks, offload=offload)
    if stats is None:
        stats = observer.collector.result({"seconds": round(time.perf_counter() - t0, 3), "with": "BESA learning pass"})
    return besa.results, stats


# ---------------------------------------------------------------------------------------------------------------
# The learned-allocator protocol (``pruner.allocation.Allocator.learner`` names ``BESA_LEARNER``)


@dataclass(frozen=True)
class Learner:
    """How a learned allocator learns. ``settings``: fixed choices that change the result (part of the cache key
    with the allocator's parameters); ``learn(model, tokens, S, stats, params, device=, batch_size=, progress=,
    should_cancel=, blocks=, offload=, context=)`` returns (result, statistics): ``result`` holds at least ``layer_names``, ``layer_block`` and
    ``layer_sparsity`` (one per prunable layer, in the statistics' order) plus whatever the learner reports;
    ``stats`` may be None, and then the learner collects them in its own pass. ``context``: the ``StatsSpec``
    (``spec``), ``cache_dir``, the ``loaded`` model, ``progress`` and ``should_cancel``, for a learner that reads or
    writes other cached things (the predictor-optimal allocation reads the damage table)."""

    settings: dict
    learn: Callable


def _learn_besa(model, tokens, sparsity, stats, params, *, device="cpu", batch_size=4, progress=None,
                should_cancel=None, blocks=None, offload=False, context=None):
    blocks, stats = learn_sparsities(model, tokens, sparsity, stats, beta=params["beta"], device=device,
                                     batch_size=batch_size, progress=progress, should_cancel=should_cancel,
                                     blocks=blocks, offload=offload)
    result = {
        "layer_names": [n for b in blocks for n in b.layer_names],
        "layer_block": [i for i, b in enumerate(blocks) for _ in b.layer_names],
        "layer_sparsity": [float(v) for b in blocks for v in b.sparsity],
        "layer_learned": [float(v) for b in blocks for v in b.learned],
        "learned_mean": [float((b.learned * b.numel).sum() / b.numel.sum()) for b in blocks],
        "shift": [b.shift for b in blocks],
        **{k: [getattr(b, k) for b in blocks] for k in ("error_first", "error_last", "error_hard", "error_uniform")},
        "steps_per_block": blocks[0].steps,
    }
    return result, stats


BESA_LEARNER = Learner(settings={"epochs": BESA_DEFAULT_EPOCHS, "lr": BESA_DEFAULT_LR, "step": BESA_STEP,
                                 "format": BESA_FORMAT_VERSION}, learn=_learn_besa)
