"""A toy allocator and a toy method, one declared parameter each, registered the way a new entry would be:
one definition plus one registry line, no edit to the CLI, the pages or the jobs (tests use ``registered``)."""

from __future__ import annotations

import contextlib

import numpy as np

from pruner.allocation import ALLOCATORS, NEEDS_LAYOUT, Allocator, check_sparsity
from pruner.core.params import Param
from pruner.methods import METHODS
from pruner.methods.base import LayerMethod
from pruner.methods.masks import select

GAMMA = Param("gamma", "γ", float, 0.05, "toy tilt: block sparsities rise linearly by 2γ from first to last block",
              low=0.0, high=0.2, step=0.01)
POWER = Param("power", "p", float, 1.0, "toy score |W|^p", low=0.0, low_open=True, step=0.5)


def tilt(n_blocks: int, sparsity: float, gamma: float) -> np.ndarray:
    """s_b = S + γ·(2b/(B − 1) − 1): mean S, span 2γ (an ATP-like arithmetic progression over depth)."""
    S = check_sparsity(sparsity)
    steps = np.linspace(-1.0, 1.0, n_blocks) if n_blocks > 1 else np.zeros(1)
    return S + gamma * steps


TOY_ALLOCATOR = Allocator("toy_tilt", "Toy tilt", "block",
                          lambda x, S, gamma: tilt(x.n_blocks, S, gamma)[np.asarray(x.layer_block)],
                          "toy: sparsity rising linearly with depth", params=(GAMMA,), needs=NEEDS_LAYOUT)


class ToyPower(LayerMethod):
    name = "toy_power"
    needs_inputs = False
    default_scope = "layer"
    description = "toy: smallest |W|^p within each layer"
    params = (POWER,)

    def __init__(self, in_features, device="cpu", scope=None, power: float = POWER.default):
        super().__init__(in_features, device, scope)
        self.power = POWER.check(power)

    def prune(self, weight, sparsity, nm=None):
        mask = select(weight.abs() ** self.power, sparsity, nm, self.scope)
        return weight.masked_fill(mask, 0.0), mask


@contextlib.contextmanager
def registered():
    """The toy entries in the registries for the duration (the registration is the one line: dict assignment)."""
    ALLOCATORS[TOY_ALLOCATOR.name] = TOY_ALLOCATOR
    METHODS[ToyPower.name] = ToyPower
    try:
        yield
    finally:
        ALLOCATORS.pop(TOY_ALLOCATOR.name, None)
        METHODS.pop(ToyPower.name, None)
