"""Wanda's score and the statistic behind it, defined once: the lowest module of the package (imports torch only).

Wanda pruning (``pruner.methods.wanda``), the outlier statistics and OWL's LOD (``pruner.engine.stats``), BESA's ranking
(``pruner.engine.besa``) and the plots all read A_ij = |W_ij| · ‖X_j‖₂ from here.
"""

from __future__ import annotations

import torch


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """A = |W| · ‖X_j‖₂ broadcast over rows. weight (out, in), input_norm (in,) → (out, in) float64.

    float64, like the Σx² behind ‖X_j‖₂ (``accumulate_sumsq``): rankings of A then follow the exact definition.
    With float32 sums over 16k calibration tokens, near-ties in block 0 of SmolLM2 already ranked differently from
    exact arithmetic, and at 70% sparsity those flips compound block after block (docs/results.md, issue 16)."""
    return weight.detach().abs().double() * input_norm.double().unsqueeze(0)


def accumulate_sumsq(sumsq: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Σ_tokens x_j² added to ``sumsq`` (None: start from zero), in float64. x: (..., in) → (in,) float64."""
    x = x.detach().reshape(-1, x.shape[-1]).double()  # (tokens, in_features)
    acc = (x * x).sum(dim=0)
    return acc if sumsq is None else sumsq + acc
