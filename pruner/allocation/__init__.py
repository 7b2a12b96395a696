"""Layerwise sparsity allocators: pure numpy, no torch, no model.

Symbols: S is the target (mean) sparsity, λ (``lam``) bounds how far a block may move from S, M (``m``) is OWL's
outlier threshold multiplier, r_i is block i's outlier ratio (LOD entry).

Invariants every allocator keeps: every sparsity is in [0, 1), and the parameter-weighted mean sparsity over all
prunable layers equals S (exactly, up to float round-off; a block formula whose blocks differ in size, as in
mixture-of-experts models with dense first blocks, is shifted to that mean by ``to_parameter_mean``). Inputs that cannot honour them raise ``ValueError`` naming the allowed range; nothing is
clamped. Where the inputs are well-formed but the allocator cannot reach S with these parameters on this model
(λ too wide, δ too steep, a global threshold that empties a layer) the error is the subclass ``AllocationRefused``,
so that a caller can tell "choose other parameters" from malformed input.
"""

from pruner.allocation.experts import (EXPERT_LAMBDA, EXPERT_M, EXPERT_PARAMS, EXPERT_SPLITS, check_expert_split,
                                       split_experts, with_expert_split)
from pruner.allocation.formulas import (ALPHA_EPSILON_FRACTION, ATP_DEFAULT_DELTA, BESA_DEFAULT_BETA, DLP_DEFAULT_ALPHA,
                                        OWL_DEFAULT_LAMBDA, OWL_DEFAULT_M, AllocationRefused, alpha_pruning, atp,
                                        atp_delta_max, check_sparsity, dlp, dlp_importance, er, global_threshold, owl,
                                        owl_inverse, owl_lambda_max, to_parameter_mean, uniform)
from pruner.allocation.registry import (ALLOCATORS, ALPHA_EPSILON, ATP_DELTA, BETA, DLP_ALPHA, LAMBDA, NEEDS,
                                        NEEDS_LAYOUT, NEEDS_STATISTICS, NEEDS_WEIGHTS, OPTIMAL_REACH, OWL_M,
                                        SEARCH_GENERATIONS, SEARCH_SCREEN, SEARCH_SEQUENTIAL, Allocation,
                                        AllocationInputs, Allocator, allocate, formula_allocators, register)

__all__ = [
    "EXPERT_LAMBDA",
    "EXPERT_M",
    "EXPERT_PARAMS",
    "EXPERT_SPLITS",
    "check_expert_split",
    "split_experts",
    "with_expert_split",
    "ALPHA_EPSILON_FRACTION",
    "ATP_DEFAULT_DELTA",
    "BESA_DEFAULT_BETA",
    "DLP_DEFAULT_ALPHA",
    "OWL_DEFAULT_LAMBDA",
    "OWL_DEFAULT_M",
    "AllocationRefused",
    "alpha_pruning",
    "atp",
    "atp_delta_max",
    "check_sparsity",
    "dlp",
    "dlp_importance",
    "er",
    "global_threshold",
    "owl",
    "owl_inverse",
    "owl_lambda_max",
    "to_parameter_mean",
    "uniform",
    "ALLOCATORS",
    "ALPHA_EPSILON",
    "ATP_DELTA",
    "BETA",
    "DLP_ALPHA",
    "LAMBDA",
    "NEEDS",
    "NEEDS_LAYOUT",
    "NEEDS_STATISTICS",
    "NEEDS_WEIGHTS",
    "OPTIMAL_REACH",
    "SEARCH_GENERATIONS",
    "SEARCH_SCREEN",
    "SEARCH_SEQUENTIAL",
    "OWL_M",
    "Allocation",
    "AllocationInputs",
    "Allocator",
    "allocate",
    "formula_allocators",
    "register",
]
