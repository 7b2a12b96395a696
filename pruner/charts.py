"""Plotly figures shared by the pages (built from numpy results; no model, no torch)."""

from __future__ import annotations

import itertools

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from pruner.allocation import ALLOCATORS, Allocation
from pruner.core.intervals import mean_accuracy_stderr


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
    for a in sorted(allocations, key=lambda a: a.allocator == REFERENCE_ALLOCATOR):  # the reference on top
        color = ALLOCATOR_COLORS.get(a.allocator, "#444444")  # the same colour on every page
        reference = a.allocator == REFERENCE_ALLOCATOR
        fig.add_trace(go.Scatter(x=x, y=a.block_sparsity * 100, mode="lines+markers", name=ALLOCATORS[a.allocator].label,
                                 line=dict(color=color, dash="dash" if reference else "solid",
                                           width=REFERENCE_STYLE["width"] if reference else 2),
                                 marker=dict(color=color)))
    fig.update_layout(title=f"Per-block sparsity at target S = {sparsity:.0%}", xaxis_title="transformer block",
                      yaxis_title="sparsity (%)", height=420, margin=dict(l=60, r=20, t=60, b=50))
    return fig


#: Up to this many cells along an index axis (blocks, experts) every index gets its tick; beyond, plotly chooses.
EVERY_TICK_UP_TO = 16


def _index_axis(count: int) -> dict:
    """Axis settings for integer positions 0..count−1: one tick each when they fit, never a tick between two."""
    return dict(dtick=1) if count <= EVERY_TICK_UP_TO else dict(tickformat="d")


def heatmap_figure(matrix: np.ndarray, layer_names: list[str], m: float) -> go.Figure:
    """Block × layer outlier ratios (%), each relative to its block's mean score."""
    fig = go.Figure(go.Heatmap(z=np.asarray(matrix).T * 100, x=np.arange(matrix.shape[0]), y=layer_names,
                               colorscale="Viridis", colorbar=dict(title="%"),
                               hovertemplate="block %{x}<br>%{y}<br>%{z:.3f}%<extra></extra>"))
    fig.update_layout(title=f"Outlier ratio per layer at M = {m:g} (scores above M × the block mean)",
                      xaxis_title="transformer block", yaxis_title="linear layer", height=380,
                      margin=dict(l=130, r=20, t=60, b=50), xaxis=_index_axis(matrix.shape[0]))
    return fig


def expert_heatmap_figure(matrix: np.ndarray, title: str, colorbar: str) -> go.Figure:
    """Block × routed-expert values (fractions, drawn in %): an expert's outlier ratio or its share of the block's
    routed calibration tokens. NaN cells (a block without that expert) stay blank."""
    z = np.asarray(matrix, dtype=np.float64).T * 100  # (experts, blocks)
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(z.shape[1]), y=np.arange(z.shape[0]), colorscale="Viridis",
                               colorbar=dict(title=colorbar),
                               hovertemplate="block %{x}<br>expert %{y}<br>%{z:.3f}%<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="transformer block", yaxis_title="routed expert",
                      height=max(320, min(900, 14 * z.shape[0] + 140)), margin=dict(l=70, r=20, t=60, b=50),
                      xaxis=_index_axis(z.shape[1]), yaxis=_index_axis(z.shape[0]))
    return fig


def layer_sparsity_heatmap_figure(allocation: Allocation, layer_names: list[str], layer_block: np.ndarray,
                                  zrange: tuple[float, float]) -> go.Figure:
    """Block × layer sparsities (%) of one allocation; ``zrange`` (in %) is shared by the heatmaps shown together,
    so equal colours mean equal sparsities."""
    blocks = np.asarray(layer_block)
    n_blocks = int(blocks.max()) + 1
    names = [n for n, b in zip(layer_names, blocks) if b == 0]
    z = np.asarray(allocation.layer_sparsity).reshape(n_blocks, len(names)).T * 100  # (layers, blocks)
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(n_blocks), y=[n.split(".")[-1] for n in names], colorscale="Viridis",
                               zmin=zrange[0], zmax=zrange[1], colorbar=dict(title="sparsity %"),
                               hovertemplate="block %{x}<br>%{y}<br>%{z:.2f}%<extra></extra>"))
    fig.update_layout(title=f"{ALLOCATORS[allocation.allocator].label}: sparsity per layer at S = "
                            f"{allocation.sparsity:.0%}", xaxis_title="transformer block", yaxis_title="linear layer",
                      height=360, margin=dict(l=90, r=20, t=60, b=50))
    return fig


def predicted_map_figure(lams, ms, perplexity: np.ndarray, sparsity: float) -> go.Figure:
    """Predicted perplexity of OWL over a (λ, M) grid (``perplexity`` (len(ms), len(lams)), NaN where λ is too
    wide), log-coloured, with the lowest point marked."""
    z = np.log10(perplexity)
    fig = go.Figure(go.Heatmap(z=z, x=list(lams), y=list(ms), colorscale="Viridis_r", customdata=perplexity,
                               colorbar=dict(title="log₁₀ ppl"),
                               hovertemplate="λ %{x:.3f}<br>M %{y:g}<br>predicted ppl %{customdata:.1f}<extra></extra>"))
    if np.isfinite(perplexity).any():
        i, j = np.unravel_index(np.nanargmin(perplexity), perplexity.shape)
        fig.add_trace(go.Scatter(x=[lams[j]], y=[ms[i]], mode="markers+text", name="lowest predicted",
                                 marker=dict(symbol="star", size=16, color="red"),
                                 text=[f"{perplexity[i, j]:.1f}"], textposition="top center"))
    fig.update_layout(title=f"OWL at S = {sparsity:.0%}: predicted perplexity over (λ, M)", xaxis_title="λ",
                      yaxis_title="M", height=380, margin=dict(l=60, r=20, t=60, b=50), showlegend=False)
    return fig


def predicted_vs_measured_figure(rows: list[dict]) -> go.Figure:
    """Measured perplexity (y, with its interval) against the predictor's (x), one colour per target sparsity,
    log axes, with the y = x line. rows: sparsity, predicted, measured, low, high, label."""
    fig = go.Figure()
    for S in sorted({r["sparsity"] for r in rows}):
        part = [r for r in rows if r["sparsity"] == S]
        fig.add_trace(go.Scatter(
            x=[r["predicted"] for r in part], y=[r["measured"] for r in part], mode="markers", name=f"S = {S:.0%}",
            text=[r["label"] for r in part],
            error_y=dict(type="data", symmetric=False,
                         array=[(r["high"] - r["measured"]) if r.get("high") else 0 for r in part],
                         arrayminus=[(r["measured"] - r["low"]) if r.get("low") else 0 for r in part]),
            hovertemplate="%{text}<br>predicted %{x:.1f}<br>measured %{y:.1f}<extra></extra>"))
    values = [v for r in rows for v in (r["predicted"], r["measured"])]
    if values:
        lo, hi = min(values), max(values)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="measured = predicted",
                                 line=dict(color="grey", dash="dot")))
    fig.update_layout(title="Measured vs predicted perplexity", xaxis_title="predicted (damage table)",
                      yaxis_title="measured (WikiText-2 test)", xaxis_type="log", yaxis_type="log", height=420,
                      margin=dict(l=60, r=20, t=60, b=50))
    return fig


def distribution_figure(edges: np.ndarray, counts: np.ndarray, m: float, above: float, title: str) -> go.Figure:
    """Histogram of A/Ā on log-spaced bins (share of weights per bin), with the M · mean threshold marked and
    ``above``, the exact share of weights above it."""
    total = counts.sum()
    lefts = np.r_[edges[0] / 10 ** 0.05, edges[:-1]]
    centers = np.sqrt(lefts * edges)  # geometric centre of (left, edge]
    share = counts[:-1] / total * 100
    # only bins that hold weights: empty ones are invisible on a log axis but stretched it to 10⁶ past the data
    held = share > 0
    fig = go.Figure(go.Bar(x=centers[held], y=share[held], width=((edges - lefts) * 0.95)[held], name="weights",
                           hovertemplate="A/Ā ≤ %{x:.3g}: %{y:.3g}%<extra></extra>"))
    fig.add_vline(x=m, line=dict(color="crimson", dash="dash"))
    # an annotation on a log axis is placed by log10(x) (the line by x itself)
    fig.add_annotation(x=float(np.log10(m)), y=1, yref="paper", text=f"M = {m:g}: {above:.2%} of weights above",
                       showarrow=False, xanchor="left", yanchor="top", xshift=4)
    # powers of ten on the axes: plotly's SI suffixes read "100µ" for 0.0001 (%); the x axis spans the held bins
    # (and M), not plotly's padding to 10⁶
    span = np.log10([min(lefts[held].min(), m), max(edges[held].max(), m)]) + [-0.1, 0.1] if held.any() else None
    fig.update_layout(title=title, xaxis=dict(type="log", title="score ÷ block mean score (A / Ā, log scale)",
                                              exponentformat="power", range=None if span is None else list(span)),
                      yaxis=dict(type="log", title="share of weights (%)", exponentformat="power"), height=380,
                      showlegend=False, margin=dict(l=60, r=20, t=60, b=50))
    return fig


#: One fixed colour per allocator, so a curve keeps its colour whichever others are shown.
ALLOCATOR_COLORS = {"uniform": "#7f7f7f", "owl": "#d62728", "owl_inverse": "#9467bd", "er": "#2ca02c",
                    "global": "#1f77b4", "alpha": "#ff7f0e", "dlp": "#e377c2", "atp": "#bcbd22", "besa": "#17becf",
                    "predicted": "#8c564b", "search": "#000080"}


#: The allocation every other is compared with, and how its curve stands out from them (SVG stroke settings).
REFERENCE_ALLOCATOR = "uniform"
REFERENCE_STYLE = {"dash": "8 5", "width": 3}


def allocation_curves_data(allocations: list[Allocation], block_numel: np.ndarray, sparsity: float,
                           lam: float | None) -> dict:
    """What the Allocation page's live curves draw (pages/_curves.js): per allocator its per-block sparsity (%) and
    the share (%) of all kept weights that each block holds, (1 − s_b)·n_b / Σ_c (1 − s_c)·n_c, with OWL's band
    [S − λ, S + λ] (%) when λ is given. Plain lists, so that the page sends a few kilobytes per slider move."""
    numel = np.asarray(block_numel, dtype=np.float64)
    series = []
    # the reference is drawn last, thick and dashed: uniform's flat line would otherwise lie hidden under any other
    # flat one (Erdős–Rényi's is flat at the block level too)
    for a in sorted(allocations, key=lambda a: a.allocator == REFERENCE_ALLOCATOR):
        kept = (1 - np.asarray(a.block_sparsity, dtype=np.float64)) * numel
        series.append({"key": a.allocator, "name": ALLOCATORS[a.allocator].label,
                       "color": ALLOCATOR_COLORS.get(a.allocator, "#444444"),
                       **(REFERENCE_STYLE if a.allocator == REFERENCE_ALLOCATOR else {}),
                       "sparsity": [float(v) * 100 for v in a.block_sparsity],
                       "kept": [float(v) for v in kept / kept.sum() * 100]})
    return {"title": f"Per-block sparsity at target S = {sparsity:.0%}",
            "kept_title": "Share of all kept weights held by each block", "blocks": len(numel),
            "band": None if lam is None else [(sparsity - lam) * 100, (sparsity + lam) * 100], "series": series}


def ppl_vs_sparsity_figure(rows: list[dict], dense: float | None) -> go.Figure:
    """Perplexity (log scale) at each target sparsity: one panel per method (shared log y axis), one line per
    allocator × parameters in its allocator's colour in every panel (one legend entry for both); rows with
    ``ppl_low`` / ``ppl_high`` get asymmetric error bars (an interval on the log scale is asymmetric in perplexity).

    The x axis is the target sparsity S as categories ("70%"), and the lines' points at one S sit side by side
    (plotly's grouped scatter), so that the error bars of allocations at the same S do not hide each other. (On an
    axis of *achieved* sparsity they did, and with one S the axis zoomed into differences of 10⁻⁵ points.) The
    achieved sparsity (row ``sparsity``) and the interval are in each point's hover; a row without ``target`` is
    placed at its achieved sparsity. (One panel with a line per method × allocator drew 17 lines from a 10-colour
    palette at 25 real SmolLM2 groups: two lines shared each colour and the side-by-side points of one S filled the
    gap to the next.)"""
    fig, facets = _method_panels(rows)
    for col, method, name, rs, style in facets:
        bars = None
        if any(r.get("ppl_low") is not None for r in rs):
            bars = dict(type="data", symmetric=False, visible=True,
                        array=[(r["ppl_high"] - r["ppl"]) if r.get("ppl_high") is not None else 0 for r in rs],
                        arrayminus=[(r["ppl"] - r["ppl_low"]) if r.get("ppl_low") is not None else 0 for r in rs])
        interval = [f" [{r['ppl_low']:,.1f}, {r['ppl_high']:,.1f}]" if r.get("ppl_low") is not None else ""
                    for r in rs]
        fig.add_trace(go.Scatter(
            x=[_target_label(_target(r)) for r in rs], y=[r["ppl"] for r in rs], mode="lines+markers", name=name,
            error_y=bars, customdata=[[r["sparsity"] * 100, i] for r, i in zip(rs, interval)], **style,
            hovertemplate=f"{method} + %{{fullData.name}}<br>target %{{x}}, achieved %{{customdata[0]:.4f}}%<br>"
                          "perplexity %{y:,.1f}%{customdata[1]}<extra></extra>"), row=1, col=col)
    if dense is not None:
        fig.add_hline(y=dense, line=dict(dash="dot", color="black"), row="all", col="all")
        # On a log axis an annotation's y is in log10 units: the label placed at y=dense (what add_hline's
        # annotation_text does) stretched the axis up to 10^dense, squashing every curve against its floor.
        fig.add_annotation(x=1, xref="x domain", y=np.log10(dense), yref="y", text=f"dense {dense:.2f}",
                           showarrow=False, xanchor="right", yanchor="bottom")
    fig.update_layout(title="WikiText-2 perplexity vs sparsity", height=450, scattermode="group",
                      margin=dict(l=60, r=20, t=80, b=50))
    fig.update_xaxes(_target_axis(rows) | dict(title="target sparsity S"))
    fig.update_yaxes(type="log")
    fig.update_yaxes(title="perplexity (log scale)", col=1)
    return fig


#: Line dash and marker of the 1st, 2nd, … parameter setting of one allocator (its colour is the allocator's).
SETTING_STYLES = (("solid", "circle"), ("dot", "diamond"), ("dash", "square"), ("dashdot", "triangle-up"),
                  ("longdash", "star"))


def _method_panels(rows: list[dict]):
    """A figure with one panel per method (shared y axis) and, per (method, allocator setting) group, its panel
    column, method, legend name (the setting: "OWL (λ=0.08, M=5)"), rows and trace style: the allocator's colour
    (``ALLOCATOR_COLORS``), the setting's dash and marker (``SETTING_STYLES``), one legend entry per setting."""
    methods = sorted({r["method"] for r in rows})
    fig = make_subplots(rows=1, cols=len(methods), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=methods)
    settings: dict[str, list[str]] = {}  # allocator -> its settings' names, in order of appearance
    for method, name, rs in _groups(rows):
        allocator = rs[0]["allocator"]
        if name not in settings.setdefault(allocator, []):
            settings[allocator].append(name)
    fallback = itertools.cycle(["#444444", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5"])  # allocators without a colour
    colors = {a: ALLOCATOR_COLORS.get(a) or next(fallback) for a in settings}
    shown: set[str] = set()
    facets = []
    for method, name, rs in _groups(rows):
        allocator = rs[0]["allocator"]
        dash, symbol = SETTING_STYLES[settings[allocator].index(name) % len(SETTING_STYLES)]
        style = dict(legendgroup=name, showlegend=name not in shown,
                     line=dict(color=colors[allocator], dash=dash), marker=dict(color=colors[allocator], symbol=symbol))
        shown.add(name)
        facets.append((methods.index(method) + 1, method, name, rs, style))
    return fig, facets


def _target(row: dict) -> float:
    """The row's target sparsity S (its achieved sparsity where it names none)."""
    return row.get("target", row["sparsity"])


def _target_label(sparsity: float) -> str:
    """'70%', or '62.5%' where a whole percent would merge two targets."""
    return f"{sparsity * 100:.4g}%"


def two_runs_figure(a, b) -> go.Figure:
    """Per-block allocated (line) and achieved (markers) sparsity of two runs (``pruner.runs.manifest.RunManifest``)."""
    fig = go.Figure()
    # each run in its allocator's colour (as on every chart); B dashed with other marks, for two runs of one allocator
    for run, dash, symbol in ((a, "solid", "x"), (b, "dash", "circle-open")):
        color = ALLOCATOR_COLORS.get(run.allocator, "#444444")
        alloc = np.asarray(run.allocation["block_sparsity"]) * 100
        achieved = np.asarray(run.achieved_block) * 100
        fig.add_trace(go.Scatter(x=np.arange(len(alloc)), y=alloc, mode="lines", name=f"{run.label} (allocated)",
                                 line=dict(color=color, dash=dash)))
        fig.add_trace(go.Scatter(x=np.arange(len(achieved)), y=achieved, mode="markers",
                                 name=f"{run.label} (achieved)", marker=dict(color=color, symbol=symbol)))
    fig.update_layout(title="Per-block sparsity of two runs", xaxis_title="transformer block",
                      yaxis_title="sparsity (%)", height=420, legend=dict(orientation="h", y=-0.2),
                      margin=dict(l=60, r=20, t=60, b=50))
    values = np.concatenate([np.asarray(t.y, dtype=float) for t in fig.data])
    if values.max() - values.min() < 2 * MIN_HALF_SPAN:  # a flat allocation: the axis zoomed into 0.03 points of noise
        middle = (values.max() + values.min()) / 2
        fig.update_yaxes(range=[middle - MIN_HALF_SPAN, middle + MIN_HALF_SPAN])
    return fig


#: Half the smallest span (percentage points) of a per-block sparsity axis: a uniform allocation's 70% against an
#: achieved 69.97% is then a flat line and a row of marks just under it, not two far-apart rows.
MIN_HALF_SPAN = 5.0


def _groups(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """Rows grouped by method × allocator × parameters: (method, the setting's name "OWL (λ=0.15, M=14.3)", its
    rows); a row's ``parameters`` is the run's parameter text, absent or empty for defaults-free entries. Groups
    sorted by method and name, rows by target S. Two settings of one allocator are two lines: one line through both
    would draw a trend that is not there."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], ALLOCATORS[r["allocator"]].setting_label(r.get("parameters"))), []).append(r)
    return [(method, name, sorted(rs, key=_target)) for (method, name), rs in sorted(groups.items())]


def _target_axis(rows: list[dict]) -> dict:
    """The x axis of target sparsities as categories in numeric order (shared by the charts against S)."""
    return dict(type="category", categoryorder="array",
                categoryarray=[_target_label(t) for t in sorted({_target(r) for r in rows})])


def zeroshot_tasks_figure(entries: list[dict], task_labels: dict[str, str], partial_note: str = "") -> go.Figure:
    """Accuracy (%) per task and the mean, one bar group per task, one bar per model (dense first), ± stderr.

    entries: [{"label": str, "tasks": {task: {"acc", "acc_stderr"}}}], all over the same tasks.
    """
    fig = go.Figure()
    tasks = list(task_labels)
    for i, e in enumerate(entries):
        accs = [e["tasks"][t]["acc"] * 100 for t in tasks]
        errs = [(e["tasks"][t].get("acc_stderr") or 0) * 100 for t in tasks]
        mean_se = mean_accuracy_stderr({t: e["tasks"][t] for t in tasks})
        fig.add_trace(go.Bar(x=[task_labels[t] for t in tasks] + ["mean"], y=accs + [sum(accs) / len(accs)],
                             error_y=dict(type="data", array=errs + [(mean_se or 0) * 100], visible=True),
                             name=e["label"],
                             marker_color="#7f7f7f" if i == 0 and e["label"].startswith("dense") else None))
    fig.update_layout(title="Zero-shot accuracy per task" + partial_note, barmode="group", yaxis_title="accuracy (%)",
                      height=460, legend=dict(orientation="h", yanchor="top", y=-0.15, x=0),
                      margin=dict(l=60, r=20, t=60, b=60))
    return fig


def accuracy_vs_sparsity_figure(rows: list[dict], dense: float | None, n_tasks: int,
                                partial_note: str = "") -> go.Figure:
    """Mean zero-shot accuracy (%) at each target sparsity (categories, points of one S side by side): one panel
    per method, one line per allocator × parameters in its allocator's colour, ± the mean's standard error (row
    ``mean_acc_stderr``, see ``mean_accuracy_stderr``) where known; achieved sparsity in the hover; dense dotted."""
    fig, facets = _method_panels(rows)
    for col, method, name, rs, style in facets:
        errors = [r.get("mean_acc_stderr") for r in rs]
        bars = (dict(type="data", visible=True, array=[(e or 0) * 100 for e in errors])
                if any(e is not None for e in errors) else None)
        fig.add_trace(go.Scatter(
            x=[_target_label(_target(r)) for r in rs], y=[r["mean_acc"] * 100 for r in rs], mode="lines+markers",
            name=name, error_y=bars, customdata=[[r["sparsity"] * 100] for r in rs], **style,
            hovertemplate=f"{method} + %{{fullData.name}}<br>target %{{x}}, achieved %{{customdata[0]:.4f}}%<br>"
                          "mean accuracy %{y:.2f}%<extra></extra>"), row=1, col=col)
    if dense is not None:
        fig.add_hline(y=dense * 100, line=dict(dash="dot", color="black"), row="all", col="all")
        fig.add_annotation(x=1, xref="x domain", y=dense * 100, yref="y", text=f"dense {dense:.1%}",
                           showarrow=False, xanchor="right", yanchor="bottom")
    fig.update_layout(title=f"Mean zero-shot accuracy over {n_tasks} task(s) vs sparsity" + partial_note,
                      scattermode="group", height=420, margin=dict(l=60, r=20, t=80, b=50))
    fig.update_xaxes(_target_axis(rows) | dict(title="target sparsity S"))
    fig.update_yaxes(title="mean accuracy (%) ± standard error", col=1)
    return fig


#: How each speed engine's lines look: (its name in the legend, decode dash, prefill dash, marker). The allocator
#: keeps its colour; the engine changes the line style, so one chart shows both engines' runs.
ENGINE_STYLES = {"deepsparse": ("DeepSparse", "solid", "dash", "circle"),
                 "openvino": ("OpenVINO 8-bit", "dot", "dashdot", "diamond")}


def speedup_vs_sparsity_figure(rows: list[dict], title_note: str = "") -> go.Figure:
    """Measured speed-up (dense time ÷ pruned time) at each target sparsity (categories): decode solid, prefill
    dashed, per method × allocator × parameters, and per engine (a row's ``engine``, default DeepSparse: OpenVINO's
    8-bit sparse ÷ 8-bit dense dotted, with diamonds); the estimated ideal decode speed-up as grey crosses; 1× as the
    break-even line; achieved sparsity in the hover."""
    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    hover = "%{fullData.name}<br>target %{x}, achieved %{customdata[0]:.4f}%<br>%{y:.2f}×<extra></extra>"
    engines = sorted({r.get("engine", "deepsparse") for r in rows}, key=list(ENGINE_STYLES).index)
    for engine in engines:
        label, decode_dash, prefill_dash, symbol = ENGINE_STYLES[engine]
        of_engine = [r for r in rows if r.get("engine", "deepsparse") == engine]
        for i, (method, setting, rs) in enumerate(_groups(of_engine)):
            name = f"{method} + {setting}" if len(engines) == 1 else f"{label}: {method} + {setting}"
            x = [_target_label(_target(r)) for r in rs]
            achieved = [[r["sparsity"] * 100] for r in rs]
            color = ALLOCATOR_COLORS.get(rs[0]["allocator"], palette[i % len(palette)])  # one colour per allocator
            fig.add_trace(go.Scatter(x=x, y=[r["decode"] for r in rs], mode="lines+markers", name=f"{name}: decode",
                                     line=dict(color=color, dash=decode_dash), marker=dict(symbol=symbol),
                                     customdata=achieved, hovertemplate=hover))
            fig.add_trace(go.Scatter(x=x, y=[r["prefill"] for r in rs], mode="lines+markers",
                                     name=f"{name}: prefill", line=dict(color=color, dash=prefill_dash),
                                     marker=dict(symbol=symbol + "-open" if engine != "deepsparse" else "square"),
                                     customdata=achieved, hovertemplate=hover))
    ideal = sorted({(_target(r), r["ideal"]) for r in rows if r.get("ideal")})
    if ideal:
        fig.add_trace(go.Scatter(x=[_target_label(s) for s, _ in ideal], y=[v for _, v in ideal], mode="markers",
                                 name="ideal decode (estimate from weights removed)",
                                 marker=dict(symbol="x", color="#7f7f7f", size=9)))
    fig.add_hline(y=1, line=dict(dash="dot", color="black"), annotation_text="dense speed")
    engine_names = " and ".join(ENGINE_STYLES[e][0] for e in engines) or "DeepSparse"
    fig.update_layout(title=f"{engine_names} speed-up vs sparsity" + title_note, xaxis_title="target sparsity S",
                      xaxis=_target_axis(rows), yaxis_title="speed-up (dense time ÷ pruned time)", height=460,
                      legend=dict(orientation="h", yanchor="top", y=-0.15, x=0), margin=dict(l=60, r=20, t=60, b=60))
    return fig


def ppl_vs_speedup_figure(rows: list[dict], dense_ppl: float | None) -> go.Figure:
    """The trade-off: perplexity (log) against measured decode speed-up, one marker per run (dense at 1×)."""
    fig = go.Figure()
    for method, setting, rs in _groups(rows):
        fig.add_trace(go.Scatter(x=[r["decode"] for r in rs], y=[r["ppl"] for r in rs], mode="markers+text",
                                 text=[f"{r['sparsity']:.0%}" for r in rs], textposition="top center",
                                 name=f"{method} + {setting}",
                                 marker=dict(size=10, color=ALLOCATOR_COLORS.get(rs[0]["allocator"]))))
    if dense_ppl is not None:
        fig.add_trace(go.Scatter(x=[1.0], y=[dense_ppl], mode="markers+text", text=["dense"],
                                 textposition="top center", name="dense", marker=dict(size=11, color="black",
                                                                                       symbol="star")))
    fig.update_layout(title="Perplexity vs decode speed-up (labels: sparsity)", xaxis_title="decode speed-up (×)",
                      yaxis_title="WikiText-2 perplexity (log scale)", yaxis_type="log", height=440,
                      margin=dict(l=60, r=20, t=60, b=50))
    return fig


def search_progress_figure(history: list[dict], seeds: dict) -> go.Figure:
    """An allocation search's fitness per generation (``pruner.predictor.search``): the parent's stage-2 KL (the
    best so far) and the median stage-1 KL of the children measured in that generation beside their parent's KL on
    the same stage-1 windows (where the history has it: searches saved before it was measured lack it), with the
    best seed's fitness as generation 0 and the seeds as dotted lines in their allocators' colours."""
    fig = go.Figure()
    gens = [0] + [h["generation"] for h in history]
    chosen = seeds.get("chosen")
    best = [seeds[chosen]["fitness"]] + [h["best"] for h in history] if chosen else [h["best"] for h in history]
    fig.add_trace(go.Scatter(x=gens if chosen else gens[1:], y=best, mode="lines", name="best (parent, stage 2)",
                             line=dict(color=ALLOCATOR_COLORS["search"], width=3)))
    fig.add_trace(go.Scatter(x=gens[1:], y=[h["median"] for h in history], mode="markers",
                             name="median of the measured children (stage 1)",
                             marker=dict(color=ALLOCATOR_COLORS["search"], size=5, opacity=0.5)))
    own = [(h["generation"], h["parent_first"]) for h in history if h.get("parent_first") is not None]
    if own:  # the children's median and their parent on one scale: the stage-1 windows
        fig.add_trace(go.Scatter(x=[g for g, _ in own], y=[f for _, f in own], mode="lines", line_shape="hv",
                                 name="their parent (stage 1)",
                                 line=dict(color=ALLOCATOR_COLORS["search"], width=1.5, dash="dash")))
    # the seeds as dotted traces named in the legend: a horizontal line's text annotation on a log axis is placed at
    # 10^y (uniform's KL of 3.47 was drawn at ~2,900 and squeezed the curves into the bottom of the chart)
    span = [gens[0], gens[-1]] if len(gens) > 1 else [0, 1]
    for name, seed in sorted(((n, s) for n, s in seeds.items() if n != "chosen"), key=lambda t: -t[1]["fitness"]):
        label = ALLOCATORS[name].label if name in ALLOCATORS else name
        fig.add_trace(go.Scatter(x=span, y=[seed["fitness"]] * 2, mode="lines", name=f"seed: {label} ({seed['fitness']:.3f})",
                                 line=dict(dash="dot", width=1.5, color=ALLOCATOR_COLORS.get(name, "#444444"))))
    fig.update_layout(title="Search: KL divergence from the dense model per generation", height=400,
                      margin=dict(l=60, r=30, t=60, b=50), legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title="generation")
    fig.update_yaxes(title="KL per token (nats, log scale)", type="log")
    return fig
