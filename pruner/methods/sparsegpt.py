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
        self._U = None  # factor of the dampened H⁻¹, once H is complete

    def accumulate(self, x):
        if self.H is None:
            raise RuntimeError("this SparseGPT state kept only its factor of H⁻¹ (keep_factor_only): it takes no inputs")
        self._U = None
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

    def _factor(self) -> torch.Tensor:
        """The upper Cholesky factor of the dampened H⁻¹, computed once and shared by the layers reading H."""
        if self._U is None:
            H = self.H.clone()
            dead = H.diagonal() == 0  # inputs that were always zero: unit curvature keeps H invertible
            H[dead, dead] = 1.0
            self._U = self._inverse_cholesky(H)
        return self._U

    def keep_factor_only(self) -> None:
        """Compute the factor of H⁻¹ now and drop H (half the memory): ``prune`` reads only the factor; the state
        accumulates no more inputs."""
        self._factor()
        self.H = None

    def prune(self, weight, sparsity, nm: NM | None = None):
        return self.prune_many([(weight, sparsity, nm)])[0]

    def prune_many(self, items):
        """Layers fed the same inputs share H, and OBS treats every output row on its own (the update of a row
        reads only that row and H⁻¹). So their rows are stacked and walked through the columns once; each layer's
        mask is still chosen from its own rows with its own sparsity, which gives the same result as one by one."""
        U = self._factor()
        # Walked in transposed layout (in, rows): column j of the weights is row j here, so each step reads and
        # updates contiguous memory (30-40% faster than the strided column walk, same arithmetic).
        Wt = torch.cat([w.detach().float() for w, _, _ in items]).T.contiguous()
        edges = [0]
        for w, _, _ in items:
            edges.append(edges[-1] + w.shape[0])
        segments = [(edges[i], edges[i + 1], s, nm) for i, (_, s, nm) in enumerate(items)]
        n_cols = Wt.shape[0]
        for _, _, _, nm in segments:
            if nm is not None and n_cols % nm.m:
                raise ValueError(f"N:M {nm} needs in_features divisible by {nm.m}; this layer has {n_cols}")
        mask_t = torch.zeros_like(Wt, dtype=torch.bool)
        for c1 in range(0, n_cols, BLOCK):
            c2 = min(c1 + BLOCK, n_cols)
            W1 = Wt[c1:c2]  # a view: updated in place
            U1 = U[c1:c2, c1:c2]
            d = U1.diagonal().unsqueeze(1)  # [H⁻¹]_jj factors, one per column of the block
            err = torch.empty_like(W1)
            block_mask = mask_t[c1:c2]
            for r1, r2, sparsity, nm in segments:
                if nm is None:  # exactly round(p · size) of this layer's weights in this block of columns
                    scores = (W1[:, r1:r2] ** 2 / d**2).T  # (rows, columns): ties broken in row-major order
                    block_mask[:, r1:r2] = lowest_mask(scores, sparsity, scope="layer").T
            for j in range(c2 - c1):
                for r1, r2, _, nm in segments:
                    if nm is not None and j % nm.m == 0:  # N:M: chosen as the walk reaches each group of M
                        group = W1[j : j + nm.m, r1:r2]
                        block_mask[j : j + nm.m, r1:r2] = nm_mask((group**2 / d[j : j + nm.m] ** 2).T, nm).T
                e = torch.mul(W1[j], block_mask[j], out=err[j]).div_(d[j])  # pruned weights' error / [H⁻¹]_jj
                W1[j:].addr_(U1[j, j:], e, alpha=-1.0)  # spread it over this and the later columns
            Wt[c2:].addmm_(U[c1:c2, c2:].T, err, alpha=-1.0)
        Wt[mask_t] = 0.0
        W, mask = Wt.T.contiguous(), mask_t.T.contiguous()
        return [(W[r1:r2], mask[r1:r2]) for r1, r2, _, _ in segments]
