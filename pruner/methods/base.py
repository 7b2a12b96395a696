"""What a pruning method is: a few per-layer functions, no calibration loop.

One instance is made per prunable layer while its block is processed: ``accumulate`` sees the layer's inputs
for every calibration mini-batch, then ``prune`` returns the new weight and its mask (True = pruned).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from pruner.core.params import Param, check_params
from pruner.methods.masks import NM


class LayerMethod(ABC):
    name: ClassVar[str]
    #: False for methods that look only at the weights (they then need no calibration forward pass).
    needs_inputs: ClassVar[bool] = True
    #: Default comparison group for unstructured selection ('row' or 'layer').
    default_scope: ClassVar[str] = "row"
    description: ClassVar[str] = ""
    #: The method's own parameters (``pruner.core.params``): the CLI flags and the dashboard's controls come from them,
    #: and ``__init__`` receives them as keywords, already checked.
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, in_features: int, device: torch.device | str = "cpu", scope: str | None = None):
        self.in_features = in_features
        self.device = torch.device(device)
        self.scope = scope or self.default_scope

    @classmethod
    def check(cls, params: dict | None) -> dict:
        """Its parameters checked, defaults filled in (ValueError names the allowed range)."""
        return check_params(f"method {cls.name!r}", cls.params, params)

    @classmethod
    def pick(cls, values: dict) -> dict:
        """The entries of ``values`` that are this method's parameters (for a page that shows several)."""
        return {p.name: values[p.name] for p in cls.params if p.name in values}

    def accumulate(self, x: torch.Tensor) -> None:
        """x: (tokens, in_features), this mini-batch's inputs to the layer."""

    @abstractmethod
    def prune(self, weight: torch.Tensor, sparsity: float, nm: NM | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """weight: (out, in) float32. Returns (pruned weight (out, in), mask (out, in) bool, True = pruned)."""

    def prune_many(self, items: list[tuple[torch.Tensor, float, NM | None]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prune several layers that were fed the same inputs (so they share this state): one (weight, mask) per
        (weight, sparsity, nm). The default prunes them one by one; a method may do them together when that gives
        the same result faster."""
        return [self.prune(w, s, nm) for w, s, nm in items]
