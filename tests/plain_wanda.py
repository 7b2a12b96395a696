"""A deliberately plain sequential Wanda (Sun et al. 2024), written to check the library's against.

Everything the library does for speed is absent here: the whole model runs in float64, one calibration sample
at a time; every linear layer has its own Σx² accumulator (no state shared between q/k/v or gate/up); each row's
weights are ranked with a stable ``argsort`` of |W_ij|·‖X_j‖₂ and the round(s · n_in) lowest are zeroed; block
i + 1 sees the outputs of the already pruned block i, recomputed sample by sample. Only the block's extra call
arguments (rotary tables, masks) are taken from the model's own forward of the first sample.
"""

from __future__ import annotations

import torch
from torch import nn

from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix


def _block_calls(model: nn.Module, sample: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """Hidden states entering block 0 for one (1, T) sample, and every block's other arguments, from one forward."""
    blocks = find_blocks(model)[1]
    calls: list = [None] * len(blocks)
    first: list = []

    def record(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                first.append(hidden.detach().clone())
            calls[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=sample, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return first[0], calls


def plain_wanda(model: nn.Module, tokens: torch.Tensor, sparsity: float) -> dict[tuple[int, str], torch.Tensor]:
    """Prune ``model`` in place (it is converted to float64) to ``sparsity`` in every row of every layer.

    tokens: (nsamples, T). Returns the masks, (block, layer name) → (out, in) bool, True = pruned.
    """
    model.double()
    blocks = find_blocks(model)[1]
    hidden, calls = [], None
    for sample in tokens:
        h, c = _block_calls(model, sample[None])
        hidden.append(h)
        calls = calls or c
    masks = {}
    for i, block in enumerate(blocks):
        args, kwargs = calls[i]
        layers = prunable_layers(block)
        sumsq = {name: torch.zeros(weight_matrix(layer).shape[1], dtype=torch.float64) for name, layer in layers.items()}

        def accumulate(name):
            def hook(module, inputs, output):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sumsq[name] += (x * x).sum(dim=0)
            return hook

        handles = [layer.register_forward_hook(accumulate(name)) for name, layer in layers.items()]
        try:
            with torch.no_grad():
                for h in hidden:
                    block(h, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            for name, layer in layers.items():
                w = weight_matrix(layer)
                score = w.abs() * sumsq[name].sqrt()[None, :]
                k = int(round(sparsity * w.shape[1]))
                order = torch.argsort(score, dim=1, stable=True)[:, :k]
                mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, order, True)
                w.masked_fill_(mask, 0.0)
                masks[(i, name)] = mask
            hidden = [_first(block(h, *args, **kwargs)) for h in hidden]
    return masks


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]
