"""Pruning methods. Adding one is one file plus one line in ``METHODS``."""

from pruner.methods.admm import ADMM, ADMMGradual
from pruner.methods.base import LayerMethod
from pruner.methods.magnitude import Magnitude
from pruner.methods.masks import NM, SCOPES
from pruner.methods.sparsegpt import SparseGPT
from pruner.methods.wanda import Wanda

METHODS: dict[str, type[LayerMethod]] = {m.name: m for m in (Magnitude, Wanda, SparseGPT, ADMM, ADMMGradual)}

__all__ = ["METHODS", "NM", "SCOPES", "LayerMethod"]
