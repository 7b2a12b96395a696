"""ADMM weight update (Boža 2024, "Fast and Effective Weight Update for Pruned Large Language Models").

The mask comes from the Wanda score; then the kept weights are refitted to the dense layer's outputs on the
calibration inputs, min ‖X Wᵀ_dense − X Wᵀ‖² subject to the mask, by ADMM on the Gram matrix G = XᵀX. In the
transposed layout of the paper (Ŵ = Wᵀ, in × out):

    Ŵ ← (G + ρI)⁻¹ (G Ŵ_dense + ρ (Z − U))      (one Cholesky factorisation of G + ρI, reused every iteration)
    Z ← Π_mask(Ŵ + U)                          (zero the pruned entries)
    U ← U + Ŵ − Z

G is normalised to unit diagonal (columns of X scaled by their norms ‖X_j‖, and the weights by the inverse, which
leaves the objective unchanged) and dampened by 10% of its mean diagonal. The result is Z: exactly the mask.

``admm-gradual`` reselects the mask over ``GRADUAL_STEPS`` steps with the cubic schedule
s_t = S − S·(1 − t/T)³ (t = 1…T), choosing at each step the smallest |Ŵ + U| in the normalised space (the
Wanda score of the current weights) and running ADMM iterations in between, then ADMM at the final mask.
"""

from __future__ import annotations

import torch

from pruner.core.params import Param
from pruner.methods.base import LayerMethod
from pruner.methods.masks import NM, select
from pruner.methods.sparsegpt import add_gram_

#: ρ, the ADMM penalty (the paper's default on normalised G).
RHO = 1.0
#: ADMM iterations at the final mask (the paper's default).
ITERATIONS = 20
#: Dampening added to the normalised G's diagonal, as a fraction of its mean diagonal (the paper's 10%).
DAMPENING = 0.1
#: Gradual pruning: number of mask reselections T and ADMM iterations between two of them.
GRADUAL_STEPS = 15
GRADUAL_ITERATIONS_PER_STEP = 2

ITERATIONS_PARAM = Param("iterations", "iterations", int, ITERATIONS, "ADMM iterations at the final mask", low=1,
                         step=1)
RHO_PARAM = Param("rho", "ρ", float, RHO, "ADMM penalty ρ on the normalised Gram matrix", low=0.0, low_open=True,
                  step=0.1)


def cubic_schedule(sparsity: float, steps: int = GRADUAL_STEPS) -> list[float]:
    """s_t = S − S·(1 − t/T)³ for t = 1…T (the last one is S)."""
    return [sparsity - sparsity * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


class ADMM(LayerMethod):
    name = "admm"
    default_scope = "row"  # the Wanda mask's comparison group
    description = "Wanda mask, kept weights refitted by ADMM on XᵀX (Boža 2024)"
    gradual = False
    params = (ITERATIONS_PARAM, RHO_PARAM)

    def __init__(self, in_features, device="cpu", scope=None, iterations: int = ITERATIONS, rho: float = RHO):
        super().__init__(in_features, device, scope)
        self.iterations, self.rho = ITERATIONS_PARAM.check(iterations), RHO_PARAM.check(rho)
        self.G = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
        self._factor = None

    def accumulate(self, x):
        self._factor = None
        add_gram_(self.G, x.float())

    def _normalised(self):
        """(norms ‖X_j‖, Cholesky factor of Ĝ + ρI, Ĝ) with Ĝ = D⁻¹GD⁻¹ + damp·I, computed once per G."""
        if self._factor is None:
            norms = self.G.diagonal().sqrt()
            norms = torch.where(norms > 0, norms, torch.ones_like(norms))  # never-active inputs: leave as is
            G = self.G / norms.unsqueeze(0) / norms.unsqueeze(1)
            G.diagonal().add_(DAMPENING * G.diagonal().mean())
            A = G.clone()
            A.diagonal().add_(self.rho)
            self._factor = (norms, torch.linalg.cholesky(A), G)
        return self._factor

    def _iterate(self, W, Z, U, keep, GW, L, steps):
        for _ in range(steps):
            W = torch.cholesky_solve(GW + self.rho * (Z - U), L)
            Z = (W + U) * keep
            U = U + W - Z
        return W, Z, U

    def prune(self, weight, sparsity, nm: NM | None = None):
        norms, L, G = self._normalised()
        W_dense = weight.detach().float().T * norms.unsqueeze(1)  # (in, out), normalised space
        GW = G @ W_dense
        if not self.gradual:
            mask = select(W_dense.abs().T, sparsity, nm, self.scope)  # = the Wanda score |W|·‖X‖ per row
            keep = (~mask).T.float()
            W, Z, U = self._iterate(W_dense, W_dense * keep, torch.zeros_like(W_dense), keep, GW, L, self.iterations)
        else:
            W, U = W_dense, torch.zeros_like(W_dense)
            schedule = cubic_schedule(sparsity)
            if nm is not None:  # N:M has one fixed density: reselect the N:M pattern at every step instead
                schedule = [sparsity] * len(schedule)
            for step, s_t in enumerate(schedule):
                mask = select((W + U).abs().T, s_t, nm, self.scope)
                keep = (~mask).T.float()
                Z = (W + U) * keep
                last = step == len(schedule) - 1
                W, Z, U = self._iterate(W, Z, U, keep, GW, L,
                                        self.iterations if last else GRADUAL_ITERATIONS_PER_STEP)
        pruned = (Z / norms.unsqueeze(1)).T.contiguous()
        return pruned.masked_fill(mask, 0.0), mask


class ADMMGradual(ADMM):
    name = "admm-gradual"
    description = "ADMM with the mask reselected over 15 steps of a cubic schedule (Boža 2024)"
    gradual = True
