"""Plotly figures shared by the pages (built from numpy results; no model, no torch)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from pruner.allocation import ALLOCATORS, Allocation


def lod_figure(lod_by_m: dict[float, np.ndarray], title: str = "Layerwise outlier distribution") -> go.Figure:
    """One line per M: share (%) of each block's Wanda scores above M × the block's mean score."""
    fig = go.Figure()
    for m, lod in lod_by_m.items():
        fig.add_trace(go.Scatter(x=np.arange(len(lod)), y=np.asarray(lod) * 100, mode="lines+markers",
                                 name=f"M = {m:g}"))
    fig.update_layout(title=title, xaxis_title="transformer block", yaxis_title="outlier ratio (%)",
                      legend_title="threshold", height=420, margin=dict(l=60, r=20, t=60, b=50))
    return fig


def allocation_figure(allocations: list[Allocation], sparsity: float, lam: float | None = None) -> go.Figure:
    """Per-block sparsity of each allocation, with OWL's band [S − λ, S + λ] when λ is given."""
    fig = go.Figure()
    n = len(allocations[0].block_sparsity)
    x = np.arange(n)
    if lam is not None:
        fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[np.full(n, sparsity + lam), np.full(n, sparsity - lam)] * 100,
                                 fill="toself", fillcolor="rgba(99,110,250,0.10)", line=dict(width=0),
                                 name="S ± λ band", hoverinfo="skip"))
    for a in allocations:
        fig.add_trace(go.Scatter(x=x, y=a.block_sparsity * 100, mode="lines+markers",
                                 name=ALLOCATORS[a.allocator].label))
    fig.update_layout(title=f"Per-block sparsity at target S = {sparsity:.0%}", xaxis_title="transformer block",
                      yaxis_title="sparsity (%)", height=420, margin=dict(l=60, r=20, t=60, b=50))
    return fig
