"""Layerwise sparsity allocation for pruning large language models (OWL and friends)."""

__version__ = "0.1.0"
