"""Evaluating models: WikiText-2 perplexity, zero-shot accuracy with lm-eval, and CPU speed (ONNX export, DeepSparse)."""
