"""Wanda (Sun et al., ICLR 2024): score |W_ij| · ‖X_j‖₂, compared within each output row by default."""

import torch

from pruner.core.scores import accumulate_sumsq, wanda_score
from pruner.methods.base import LayerMethod
from pruner.methods.masks import select


class Wanda(LayerMethod):
    name = "wanda"
    default_scope = "row"
    description = "|W|·‖X‖₂ within each output row (Sun et al. 2024)"

    def __init__(self, in_features, device="cpu", scope=None):
        super().__init__(in_features, device, scope)
        self.sumsq = torch.zeros(in_features, dtype=torch.float64, device=self.device)  # Σ_tokens x_j², float64

    def accumulate(self, x):
        self.sumsq = accumulate_sumsq(self.sumsq, x)

    def prune(self, weight, sparsity, nm=None):
        mask = select(wanda_score(weight, self.sumsq.sqrt()), sparsity, nm, self.scope)
        return weight.masked_fill(mask, 0.0), mask
