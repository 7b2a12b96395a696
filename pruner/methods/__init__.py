"""Pruning methods. Adding one is one file plus one line in ``METHODS``."""

from pruner.methods.admm import ADMM, ADMMGradual
from pruner.methods.base import LayerMethod
from pruner.methods.magnitude import Magnitude
from pruner.methods.masks import NM, SCOPES
from pruner.methods.sparsegpt import SparseGPT
from pruner.methods.wanda import Wanda

METHODS: dict[str, type[LayerMethod]] = {}


def register(method: type[LayerMethod]) -> type[LayerMethod]:
    """Add a method to the registry (its CLI flags, page controls and validation follow from its ``params``)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _m in (Magnitude, Wanda, SparseGPT, ADMM, ADMMGradual):
    register(_m)

__all__ = ["METHODS", "NM", "SCOPES", "LayerMethod", "register"]
