"""The computations over a model: the blockwise calibration loop, statistics, pruning, BESA's learning, LoRA recovery,
memory plans, and the cached artifacts (statistics, allocations, learned allocations) built from them."""
