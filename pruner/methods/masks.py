"""Exact-count mask selection shared by the pruning methods.

Masks are boolean tensors shaped like the weight, **True where a weight is pruned**. Selection is by rank, never
by a threshold alone, so the count is exact even when scores tie (the bundled model is dequantized 4-bit: many
ties). Ties are broken by position (as a stable sort would), so results are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Comparison groups for unstructured selection: within each output row (Wanda's choice) or the whole layer.
SCOPES = ("row", "layer")


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: at most N non-zero weights in every M consecutive input weights of a row
    (the hardware convention: 2:4 keeps 2 of every 4). Sparsity 1 − N/M."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 1 <= self.n < self.m):
            raise ValueError(f"N:M needs integers 1 ≤ N < M; got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: str) -> "NM":
        try:
            n, m = (int(p) for p in text.split(":"))
        except ValueError as err:
            raise ValueError(f"N:M must look like 2:4 or 4:8; got {text!r}") from err
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def prune_count(size: int, sparsity: float) -> int:
    """How many of ``size`` weights to prune for ``sparsity``: round(sparsity · size)."""
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}")
    return int(round(sparsity * size))


def lowest_mask(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Prune exactly round(sparsity · group size) lowest-scoring weights in each comparison group.

    scores: (out, in). scope 'row': each output row is a group; 'layer': the whole matrix is one group.
    The result equals a stable sort's first k positions: everything below the k-th smallest score, then, among
    the scores equal to it, the earliest positions until the count is k. Found with ``kthvalue`` (linear time),
    2-6× faster than sorting at these sizes.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    groups = scores.reshape(1, -1) if scope == "layer" else scores
    k = prune_count(groups.shape[1], sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(groups, k, dim=1, keepdim=True).values
    below = groups < kth
    ties_needed = k - below.sum(dim=1, keepdim=True)
    tied = groups == kth
    mask = below | (tied & (tied.cumsum(dim=1) <= ties_needed))
    return mask.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """In every group of M consecutive input weights of each row, prune the M − N lowest. scores: (out, in)."""
    out_f, in_f = scores.shape
    if in_f % nm.m:
        raise ValueError(f"N:M {nm} needs in_features divisible by {nm.m}; this layer has {in_f}")
    groups = scores.reshape(out_f, in_f // nm.m, nm.m)
    order = torch.argsort(groups, dim=2, stable=True)[:, :, : nm.m - nm.n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order, True)
    return mask.reshape(out_f, in_f)


def select(scores: torch.Tensor, sparsity: float, nm: NM | None, scope: str) -> torch.Tensor:
    """N:M mask when ``nm`` is given (``sparsity`` is then implied by it), else the exact-count mask."""
    return nm_mask(scores, nm) if nm is not None else lowest_mask(scores, sparsity, scope)
