"""Sequential pruning: orchestration only (the loop is ``calibrate.run_blockwise``, the math is in ``methods``).

Block i is run on inputs produced by the already pruned blocks before it; its layers' methods accumulate what
they need during that pass, the block is pruned, and it runs once more so the next block sees the pruned outputs
(the protocol of Wanda and SparseGPT). Methods that need no activations (magnitude) prune without any forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from pruner.engine.calibrate import BlockStore, Cancelled, LayerNeverRan, ProgressFn, ResidentBlocks, run_blockwise
from pruner.methods import METHODS, NM, LayerMethod
from pruner.model.anatomy import block_zero_count, find_blocks, is_expert_unit, prunable_layers, weight_matrix

#: An expert that fewer calibration tokens than this were routed to has no activation statistics to prune by and
#: is pruned by magnitude within each row (Wanda's score with every ‖X_j‖₂ = 1) instead, for every method; the
#: manifest counts these per block. One token is already a real (if noisy) estimate, kept as such: each expert's
#: routed token count is in the manifest too.
MIN_ROUTED_TOKENS = 1
#: What such an expert is pruned with.
EXPERT_FALLBACK_METHOD = "magnitude"


@dataclass
class LayerTarget:
    sparsity: float  # allocated sparsity (used when nm is None)
    nm: NM | None  # N:M pattern for this layer, or None for unstructured
    dense: bool = False  # N:M with N = M: leave the layer as it is


@dataclass
class LayerReport:
    block: int
    name: str
    allocated: float
    achieved: float  # zeros in the weight after pruning ÷ its size, measured from the weights
    pruned: int  # weights the method masked
    numel: int
    nm: str | None = None
    tokens: int | None = None  # calibration tokens the layer saw (a routed expert: those routed to it)
    fallback: str | None = None  # the method used instead of the run's, when too few tokens reached the expert


@dataclass
class PruneReport:
    layers: list[LayerReport] = field(default_factory=list)
    #: per block, (zeros, numel) over EVERY parameter of the block (norms, biases, routers, unpruned weights too)
    block_zeros: list[tuple[int, int]] = field(default_factory=list)

    def decoder_overall(self) -> float:
        """Zeros ÷ parameters over all weights of all decoder blocks, whatever the method pruned."""
        return sum(z for z, _ in self.block_zeros) / sum(n for _, n in self.block_zeros)

    def decoder_block(self) -> list[float]:
        return [z / n for z, n in self.block_zeros]

    def fallbacks_per_block(self) -> list[int]:
        """How many experts' matrices of each block were pruned by the fallback (too few routed tokens)."""
        n_blocks = max(l.block for l in self.layers) + 1
        counts = [0] * n_blocks
        for l in self.layers:
            counts[l.block] += l.fallback is not None
        return counts

    def block_achieved(self) -> np.ndarray:
        n_blocks = max(l.block for l in self.layers) + 1
        zeros = np.zeros(n_blocks)
        sizes = np.zeros(n_blocks)
        for l in self.layers:
            zeros[l.block] += l.achieved * l.numel
            sizes[l.block] += l.numel
        return zeros / sizes

    def overall(self) -> float:
        return sum(l.achieved * l.numel for l in self.layers) / sum(l.numel for l in self.layers)


def layer_targets(layer_sparsity: np.ndarray, layer_keys: list[tuple[int, str]], nm: NM | None) -> dict:
    """(block, name) → LayerTarget. With N:M, each layer's N is round(M · (1 − s)) (OWL's mixed N:M)."""
    out = {}
    for key, s in zip(layer_keys, layer_sparsity):
        if nm is None:
            out[key] = LayerTarget(float(s), None)
            continue
        n = int(round(nm.m * (1 - s)))
        if n < 1:
            raise ValueError(f"layer {key} would keep 0 of every {nm.m} weights (allocated sparsity {s:.3f}); "
                             f"use a smaller λ")
        out[key] = LayerTarget(float(s), NM(n, nm.m) if n < nm.m else None, dense=n >= nm.m)
    return out


def _store(layer: nn.Module, target: LayerTarget, block: int, name: str, result, tokens: int | None = None,
           fallback: str | None = None) -> LayerReport:
    """Write a method's result (new weight, mask) into the layer (None: left dense) and measure it."""
    weight = weight_matrix(layer)  # (out, in) view of the parameter
    numel = weight.numel()
    pruned = 0
    if result is not None:
        new, mask = result
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype))
        pruned = int(mask.sum())
    zeros = int((weight == 0).sum())
    allocated = target.nm.sparsity if target.nm is not None else (0.0 if target.dense else target.sparsity)
    return LayerReport(block, name, allocated, zeros / numel, pruned, numel, str(target.nm) if target.nm else None,
                       tokens, fallback)


def _apply_group(layers: dict[str, nn.Module], method: LayerMethod, targets: dict, block: int,
                 tokens: int | None = None, fallback: str | None = None) -> list[LayerReport]:
    """Prune the layers that share ``method``'s state together (``prune_many``) and report each."""
    todo = [name for name in layers if not targets[(block, name)].dense]
    items = [(weight_matrix(layers[n]).detach().float(), targets[(block, n)].sparsity, targets[(block, n)].nm)
             for n in todo]
    results = dict(zip(todo, method.prune_many(items))) if items else {}
    return [_store(layer, targets[(block, n)], block, n, results.get(n), tokens, fallback)
            for n, layer in layers.items()]


class PruningObserver:
    """A ``BlockObserver`` that feeds each layer's inputs to its method, then prunes the block.

    Layers that receive the very same input tensor (q/k/v after the attention norm, gate/up after the MLP norm)
    share one method state: it is accumulated once and each layer is pruned from it (a method's state depends
    only on the inputs, and ``prune`` does not modify it). For SparseGPT this halves the Hessian work.
    """

    #: ``finish`` always changes the block, so the loop may skip work whose only use is the first pass's outputs
    first_pass_outputs_unused = True

    def __init__(self, method: str, targets: dict, scope: str, device: torch.device, share_inputs: bool = True,
                 method_params: dict | None = None, min_routed_tokens: int = MIN_ROUTED_TOKENS):
        self.cls = METHODS[method]
        self.method_params = self.cls.check(method_params)
        self.targets = targets
        self.scope = scope
        self.device = device
        #: False: every layer accumulates its own state even when a sibling saw the same tensor (same result,
        #: more work; kept to show that sharing changes nothing: bench/wanda_drift.py)
        self.share_inputs = share_inputs
        self.min_routed_tokens = min_routed_tokens
        self.report = PruneReport()
        self._state: dict[str, LayerMethod] = {}  # layer name → the method state it reads
        self._tokens: dict[int, int] = {}  # id(state) → tokens it accumulated
        self._call: dict[int, tuple[torch.Tensor, LayerMethod]] = {}  # id(input) → (input, state), per block call

    def attach(self, index, block, layers):
        self._state = {}
        self._call = {}
        handles = [block.register_forward_pre_hook(lambda module, args: self._call.clear())]
        for name, layer in layers.items():

            def hook(module, args, output, name=name):
                x = args[0]
                seen = self._call.get(id(x))
                if self.share_inputs and seen is not None and seen[0] is x:  # a sibling's tensor: share its state
                    self._state.setdefault(name, seen[1])
                    return
                state = self._state.get(name)
                if state is None:
                    state = self._state[name] = self.cls(x.shape[-1], self.device, self.scope, **self.method_params)
                self._call[id(x)] = (x, state)
                rows = x.detach().reshape(-1, x.shape[-1])
                self._tokens[id(state)] = self._tokens.get(id(state), 0) + rows.shape[0]
                state.accumulate(rows)

            handles.append(layer.register_forward_hook(hook))
        return handles

    def finish(self, index, block, layers) -> bool:
        self._call = {}
        # layers sharing one state, in module order: id → (state, {name: layer}, tokens it saw, fallback method)
        groups: dict[int, tuple[LayerMethod, dict, int, str | None]] = {}
        for name, layer in layers.items():
            state = self._state.get(name)
            if state is None and not is_expert_unit(name):
                raise LayerNeverRan(index, [name])
            tokens = self._tokens.get(id(state), 0) if state is not None else 0
            fallback = None
            if is_expert_unit(name) and tokens < self.min_routed_tokens:
                # too few tokens were routed to this expert: prune it by magnitude within its rows instead
                state = METHODS[EXPERT_FALLBACK_METHOD](weight_matrix(layer).shape[1], self.device, self.scope)
                fallback = EXPERT_FALLBACK_METHOD
            groups.setdefault(id(state), (state, {}, tokens, fallback))[1][name] = layer
        self._state, self._tokens = {}, {}
        reports = {}
        # each state is dropped once its layers are pruned: a SparseGPT state holds H and, once pruning starts, the
        # factor of H⁻¹ (two in × in matrices); a block of 128 experts would otherwise keep all of them to the end
        for key in list(groups):
            state, members, tokens, fallback = groups.pop(key)
            for report in _apply_group(members, state, self.targets, index, tokens, fallback):
                reports[report.name] = report
            del state
        self.report.layers.extend(reports[name] for name in layers)  # report in module order
        self.report.block_zeros.append(block_zero_count(block))
        return True


def prune_model(
    model: nn.Module,
    tokens: torch.Tensor | None,
    method: str,
    targets: dict,
    scope: str,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    method_params: dict | None = None,
    blocks: BlockStore | None = None,
    offload: bool = False,
) -> PruneReport:
    """Prune ``model`` in place, block by block, to ``targets`` ((block, name) → LayerTarget), with the method's
    own parameters ``method_params`` (declared in its ``params``; missing ones take their defaults). ``blocks``:
    where the blocks' weights come from and go; ``offload``: the calibration activations live in CPU memory
    (``pruner.engine.calibrate.run_blockwise``)."""
    device = torch.device(device)
    method_params = METHODS[method].check(method_params)
    if METHODS[method].needs_inputs:
        observer = PruningObserver(method, targets, scope, device, method_params=method_params)
        run_blockwise(model, tokens, observer, device=device, batch_size=batch_size, progress=progress,
                      should_cancel=should_cancel, blocks=blocks, offload=offload)
        return observer.report
    report = PruneReport()
    store = blocks if blocks is not None else ResidentBlocks()
    _, decoder_blocks = find_blocks(model)
    for i, block in enumerate(decoder_blocks):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled before block {i} of {len(decoder_blocks)}")
        store.fetch(i, block, device)
        try:
            for name, layer in prunable_layers(block).items():
                state = METHODS[method](weight_matrix(layer).shape[1], device, scope, **method_params)
                report.layers.extend(_apply_group({name: layer}, state, targets, i))
            report.block_zeros.append(block_zero_count(block))
        finally:
            store.release(i, block)
        if progress is not None:
            progress(i + 1, len(decoder_blocks))
    return report
