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

from pruner.calibrate import BlockStore, Cancelled, ProgressFn, ResidentBlocks, run_blockwise
from pruner.methods import METHODS, NM, LayerMethod
from pruner.models import find_blocks, prunable_layers, weight_matrix


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


@dataclass
class PruneReport:
    layers: list[LayerReport] = field(default_factory=list)

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


def _store(layer: nn.Module, target: LayerTarget, block: int, name: str, result) -> LayerReport:
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
    return LayerReport(block, name, allocated, zeros / numel, pruned, numel, str(target.nm) if target.nm else None)


def _apply_group(layers: dict[str, nn.Module], method: LayerMethod, targets: dict, block: int) -> list[LayerReport]:
    """Prune the layers that share ``method``'s state together (``prune_many``) and report each."""
    todo = [name for name in layers if not targets[(block, name)].dense]
    items = [(weight_matrix(layers[n]).detach().float(), targets[(block, n)].sparsity, targets[(block, n)].nm)
             for n in todo]
    results = dict(zip(todo, method.prune_many(items))) if items else {}
    return [_store(layer, targets[(block, n)], block, n, results.get(n)) for n, layer in layers.items()]


class PruningObserver:
    """A ``BlockObserver`` that feeds each layer's inputs to its method, then prunes the block.

    Layers that receive the very same input tensor (q/k/v after the attention norm, gate/up after the MLP norm)
    share one method state: it is accumulated once and each layer is pruned from it (a method's state depends
    only on the inputs, and ``prune`` does not modify it). For SparseGPT this halves the Hessian work.
    """

    #: ``finish`` always changes the block, so the loop may skip work whose only use is the first pass's outputs
    first_pass_outputs_unused = True

    def __init__(self, method: str, targets: dict, scope: str, device: torch.device, share_inputs: bool = True,
                 method_params: dict | None = None):
        self.cls = METHODS[method]
        self.method_params = self.cls.check(method_params)
        self.targets = targets
        self.scope = scope
        self.device = device
        #: False: every layer accumulates its own state even when a sibling saw the same tensor (same result,
        #: more work; kept to show that sharing changes nothing: bench/wanda_drift.py)
        self.share_inputs = share_inputs
        self.report = PruneReport()
        self._state: dict[str, LayerMethod] = {}  # layer name → the method state it reads
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
                state.accumulate(x.detach().reshape(-1, x.shape[-1]))

            handles.append(layer.register_forward_hook(hook))
        return handles

    def finish(self, index, block, layers) -> bool:
        self._call = {}
        groups: dict[int, tuple[LayerMethod, dict]] = {}  # layers sharing one state, in module order
        for name, layer in layers.items():
            if name not in self._state:
                raise RuntimeError(f"block {index}: layer {name} never ran during calibration")
            state = self._state[name]
            groups.setdefault(id(state), (state, {}))[1][name] = layer
        reports = {}
        for state, members in groups.values():
            for report in _apply_group(members, state, self.targets, index):
                reports[report.name] = report
        self.report.layers.extend(reports[name] for name in layers)  # report in module order
        self._state = {}
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
    (``pruner.calibrate.run_blockwise``)."""
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
        finally:
            store.release(i, block)
        if progress is not None:
            progress(i + 1, len(decoder_blocks))
    return report
