"""Magnitude pruning: remove the weights of smallest |W| (within each layer by default)."""

from pruner.methods.base import LayerMethod
from pruner.methods.masks import select


class Magnitude(LayerMethod):
    name = "magnitude"
    needs_inputs = False
    default_scope = "layer"
    description = "smallest |W| within each layer"

    def prune(self, weight, sparsity, nm=None):
        mask = select(weight.abs(), sparsity, nm, self.scope)
        return weight.masked_fill(mask, 0.0), mask
