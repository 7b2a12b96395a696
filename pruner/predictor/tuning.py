"""Choosing an allocator's parameters by the damage table, and the rank agreement of predictions with measurements."""

from __future__ import annotations

import numpy as np

from pruner.predictor.table import DamageTable

#: Points per parameter when tuning against the predictor (over the parameter's slider range).
TUNE_POINTS = 11


#: Decimals the tuning grid's values are rounded to (far below any parameter's step).
TUNE_DECIMALS = 9


def tune_parameters(table: DamageTable, inputs, allocator: str, sparsity: float,
                    points: int = TUNE_POINTS) -> dict:
    """The allocator's parameters that minimise the predicted perplexity at S, searched over a grid of ``points``
    values per parameter across each parameter's slider range (``pruner.core.params.Param.slider``; a parameter without
    one keeps its default). Never reads the test split: the predictor's table was measured on held-out validation
    windows. Returns {"params", "predicted", "tried", "skipped"} (skipped: combinations outside an allocator's
    allowed range at this S)."""
    import itertools

    from pruner.allocation import ALLOCATORS, allocate

    a = ALLOCATORS[allocator]
    if a.learned:
        raise ValueError(f"{a.label} is learned, not computed from parameters on a grid; nothing to tune")
    # grid values rounded so that a tuned 0.15 is the run a user gets by typing 0.15 (linspace gives 0.15000000000000002)
    axes = {p.name: (np.round(np.linspace(p.slider[0], p.slider[1], points), TUNE_DECIMALS) if p.slider
                     else [p.default]) for p in a.params}
    best, tried, skipped = None, 0, 0
    for combo in itertools.product(*axes.values()):
        params = {n: float(v) for n, v in zip(axes, combo)}
        tried += 1
        try:
            a_ = allocate(allocator, inputs, sparsity, **params)
            predicted = table.predict_allocation(a_.block_sparsity, a_.layer_sparsity).perplexity
        except ValueError:
            skipped += 1
            continue
        if best is None or predicted < best[1]:
            best = (params, predicted)
    if best is None:
        raise ValueError(f"no {a.label} parameters on the tuning grid give an allocation the predictor can read at "
                         f"S = {sparsity:g}")
    return {"params": best[0], "predicted": best[1], "tried": tried, "skipped": skipped}


def spearman(predicted, measured) -> tuple[float, int]:
    """(Spearman rank correlation, n) of two equal-length sequences; NaN when fewer than 3 (ties take mean ranks)."""
    import pandas as pd

    x, y = pd.Series(list(predicted), dtype=float), pd.Series(list(measured), dtype=float)
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of one length; got {len(x)} and {len(y)}")
    return (float(x.rank().corr(y.rank())) if len(x) > 2 else float("nan")), len(x)
