"""Fitting how block damages compound: random probe allocations measured whole, and a non-negative
least-squares fit of the two compounding weights γ₊, γ₋ (see ``pruner.predictor.table``)."""

from __future__ import annotations

import numpy as np

from pruner.predictor.table import DamageTable

#: Probe allocations measured whole for the fit, their seed, and the spreads r (max |s_b − S₀|) they cycle through.
COMPOUNDING_PROBES = 8


COMPOUNDING_SEED = 0


COMPOUNDING_SPREADS = (0.05, 0.1, 0.15, 0.2)


def probe_allocations(table: DamageTable, probes: int = COMPOUNDING_PROBES, seed: int = COMPOUNDING_SEED,
                      spreads=COMPOUNDING_SPREADS) -> np.ndarray:
    """Per-block sparsities of the compounding fit's probes: S₀ + r · z, z a random walk over the blocks (cumulative
    sum of standard normal steps, centred, scaled to max |z| = 1), so that neighbouring blocks move together as the
    allocators move them; r cycles through ``spreads``; each s_b clipped to the range the table measured. None of
    them is an allocator's allocation. (probes, B)"""
    rng = np.random.default_rng(seed)
    points = table.points()
    out = np.zeros((probes, table.n_blocks))
    for i in range(probes):
        z = np.cumsum(rng.standard_normal(table.n_blocks))
        z -= z.mean()
        if np.abs(z).max() > 0:  # one block: no walk, the probe is the reference
            z /= np.abs(z).max()
        out[i] = np.clip(table.anchor + spreads[i % len(spreads)] * z, points[0], points[-1])
    return np.round(out, 4)


