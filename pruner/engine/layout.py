"""What the allocators that need no calibration data read: each prunable layer's name, block and shape, and (from
the dense weights alone) its PL_Alpha_Hill, the heavy-tail exponent AlphaPruning allocates by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix

#: Share of the eigenvalues (the largest) that the Hill estimator treats as the power-law tail; 0.5 puts x_min at
#: the median eigenvalue, AlphaPruning's choice.
HILL_TAIL_FRACTION = 0.5


def hill_alpha(eigenvalues: np.ndarray, tail_fraction: float = HILL_TAIL_FRACTION) -> float:
    """PL_Alpha_Hill: the Hill estimate of the power-law exponent α of an eigenvalue spectrum's tail.

    With the eigenvalues sorted ascending and x_min = λ_i at i = ⌊n·(1 − tail_fraction)⌋, the tail is
    λ_i…λ_{n−1} (k values, x_min included) and α = 1 + k / Σ_tail ln(λ / x_min). Lower α: heavier tail.
    """
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    lam = lam[lam > 0]
    if len(lam) < 2:
        raise ValueError("the Hill estimator needs at least two positive eigenvalues")
    i = int(len(lam) * (1 - tail_fraction))
    tail = lam[min(i, len(lam) - 2):]
    spread = np.log(tail / tail[0]).sum()
    if spread <= 0:
        raise ValueError("the eigenvalue tail is flat: PL_Alpha_Hill is undefined")
    return float(1 + len(tail) / spread)


def layer_alpha(weight: torch.Tensor) -> float:
    """PL_Alpha_Hill of the eigenvalues of WᵀW (the squared singular values of W), in float64; NaN where it is
    undefined (fewer than two positive eigenvalues, or a flat tail), which the AlphaPruning allocator rejects."""
    w = weight.detach().double().cpu()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # the smaller Gram: same nonzero eigenvalues
    # numpy's LAPACK, not torch.linalg.eigvalsh: both take ~0.02 s per SmolLM2 Gram on an idle 2-core Intel Xeon,
    # but with another process busy on the cores torch's MKL float64 eigensolver took 4-8 s per Gram (81% of a
    # statistics pass, which then ran 12 min; tests run workers beside the test process) and numpy's 0.03-0.1 s.
    # Eigenvalues agree to 5e-15 of the largest, α to 1e-14; the golden prune digests (AlphaPruning included) hold.
    try:
        return hill_alpha(np.clip(np.linalg.eigvalsh(gram.numpy()), 0, None))
    except ValueError:
        return float("nan")


@dataclass
class ModelLayout:
    """What the allocators that need no calibration data read (``pruner.allocation.NEEDS_LAYOUT`` and
    ``NEEDS_WEIGHTS``), taken from the model without a forward pass; layers in the same order as ``Stats``.

    ``layer_alpha`` exists only when asked for (``weights=True``): it is the same per-layer PL_Alpha_Hill the
    statistics pass stores, computed by the same function from the same weights.
    """

    layer_names: list[str]
    layer_block: np.ndarray  # (L,) int
    layer_shapes: np.ndarray  # (L, 2) int: (out_features, in_features)
    alpha: np.ndarray | None = None  # (L,) float64 PL_Alpha_Hill, or None when not computed

    @classmethod
    def of(cls, model: nn.Module, weights: bool = False, blocks=None, device=None) -> "ModelLayout":
        """The layout of ``model``'s prunable layers and, with ``weights``, each one's PL_Alpha_Hill. ``blocks``
        (a ``pruner.engine.calibrate.BlockStore``, e.g. a streamed model's) provides each block's weights for its turn;
        shapes alone need none."""

        names, block_of, shapes, alphas = [], [], [], []
        for index, block in enumerate(find_blocks(model)[1]):
            fetched = weights and blocks is not None
            if fetched:
                blocks.fetch(index, block, torch.device(device or "cpu"))
            try:
                for name, layer in prunable_layers(block).items():
                    w = weight_matrix(layer)
                    names.append(name)
                    block_of.append(index)
                    shapes.append((int(w.shape[0]), int(w.shape[1])))
                    if weights:
                        alphas.append(layer_alpha(w))
            finally:
                if fetched:
                    blocks.release(index, block)
        return cls(names, np.asarray(block_of, dtype=np.int64), np.asarray(shapes, dtype=np.int64),
                   np.asarray(alphas, dtype=np.float64) if weights else None)

    @property
    def n_blocks(self) -> int:
        return int(self.layer_block.max()) + 1

    @property
    def layer_alpha(self) -> np.ndarray:
        if self.alpha is None:
            raise ValueError("PL_Alpha_Hill was not computed for this layout; build it with ModelLayout.of(model, "
                             "weights=True)")
        return self.alpha

    def _needs_statistics(self, what: str):
        raise ValueError(f"{what} needs the dense model's calibration statistics, not just its layout; "
                         f"compute them first (pruner.engine.artifacts.get_stats, CLI `stats`)")

    @property
    def score_hist(self):
        self._needs_statistics("the Wanda-score histogram (global threshold)")

    def lod(self, m: float):
        self._needs_statistics("the Layerwise Outlier Distribution (OWL)")
