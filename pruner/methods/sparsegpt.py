"""SparseGPT (Frantar & Alistarh, ICML 2023): OBS reconstruction with the layer Hessian H = XᵀX.

Columns are processed left to right in lazy blocks of ``BLOCK`` columns. Within a block the mask is chosen once
from the OBS saliency w² / [H⁻¹]_jj² (exactly round(p · size) weights per block of columns; for N:M, per group
of M columns as the walk reaches it), and each pruned weight's error is spread over the not-yet-processed
columns through the upper Cholesky factor of H⁻¹. Everything runs in float32.
"""

import torch

from pruner.methods.base import LayerMethod
from pruner.methods.masks import NM, lowest_mask, nm_mask

#: Lazy-batch width (columns updated together), as in the paper.
BLOCK = 128
#: Dampening added to H's diagonal, as a fraction of its mean diagonal (the paper's 1%).
DAMPENING = 0.01
#: XᵀX is accumulated as a grid of column blocks of about this width, computing only the blocks on and above the
#: diagonal (k(k+1)/2 of k² products) and mirroring the rest: XᵀX is symmetric.
GRAM_BLOCK = 384


def add_gram_(H: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """H += xᵀx in place, using symmetry. H: (n, n), x: (tokens, n)."""
    n = x.shape[1]
    edges = list(range(0, n, block)) + [n]
    for i in range(len(edges) - 1):
        a, b = edges[i], edges[i + 1]
        xa = x[:, a:b].T
        H[a:b, a:b] += xa @ x[:, a:b]
        for j in range(i + 1, len(edges) - 1):
            c, d = edges[j], edges[j + 1]
            product = xa @ x[:, c:d]
            H[a:b, c:d] += product
            H[c:d, a:b] += product.T


class HessianNotPositiveDefinite(ValueError):
    pass


class SparseGPT(LayerMethod):
    name = "sparsegpt"
    default_scope = "row"  # unused: the mask is chosen per block of columns
    description = "OBS weight reconstruction with H = XᵀX (Frantar & Alistarh 2023)"

    def __init__(self, in_features, device="cpu", scope=None):
        super().__init__(in_features, device, scope)
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
        self.tokens = 0

    def accumulate(self, x):
        add_gram_(self.H, x.float())  # (in, in); its scale does not matter for the update
        self.tokens += x.shape[0]

    def _inverse_cholesky(self, H: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor of (H + λI)⁻¹ with λ = DAMPENING · mean diag(H)."""
        H = H.clone()
        H.diagonal().add_(DAMPENING * H.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() != 0:
            raise HessianNotPositiveDefinite(
                f"the layer Hessian XᵀX is not positive definite even after {DAMPENING:.0%} dampening "
                f"(Cholesky failed at column {info.item()}); use more calibration tokens or another method"
            )
        # (H + λI)⁻¹ via two triangular solves: torch.cholesky_inverse is ~40× slower on CPU at 1536 × 1536.
        Hinv = torch.cholesky_solve(torch.eye(H.shape[0], dtype=H.dtype, device=H.device), L)
        return torch.linalg.cholesky(Hinv, upper=True)

    def prune(self, weight, sparsity, nm: NM | None = None):
        W = weight.detach().float().clone()
        H = self.H.clone()
        dead = H.diagonal() == 0  # inputs that were always zero: give them unit curvature so H stays invertible
        H[dead, dead] = 1.0
        U = self._inverse_cholesky(H)  # (in, in) upper triangular
        n_cols = W.shape[1]
        mask = torch.zeros_like(W, dtype=torch.bool)
        for c1 in range(0, n_cols, BLOCK):
            c2 = min(c1 + BLOCK, n_cols)
            W1 = W[:, c1:c2].clone()
            U1 = U[c1:c2, c1:c2]
            d = U1.diagonal()
            err = torch.zeros_like(W1)
            if nm is None:
                block_mask = lowest_mask(W1**2 / d.unsqueeze(0) ** 2, sparsity, scope="layer")
            else:
                if (c2 - c1) % nm.m:
                    raise ValueError(f"N:M {nm} needs in_features divisible by {nm.m}; this layer has {n_cols}")
                block_mask = torch.zeros_like(W1, dtype=torch.bool)
            for j in range(c2 - c1):
                if nm is not None and j % nm.m == 0:
                    block_mask[:, j : j + nm.m] = nm_mask(W1[:, j : j + nm.m] ** 2 / d[j : j + nm.m] ** 2, nm)
                w = W1[:, j]
                q = w.masked_fill(block_mask[:, j], 0.0)
                e = (w - q) / d[j]
                W1[:, j:] -= e.unsqueeze(1) * U1[j, j:].unsqueeze(0)
                W1[:, j] = q
                err[:, j] = e
            W[:, c1:c2] = W1
            mask[:, c1:c2] = block_mask
            W[:, c2:] -= err @ U[c1:c2, c2:]
        W[mask] = 0.0
        return W, mask
