"""The Allocation page's live per-block curves: a small Streamlit component (``_curves.js``) that redraws its SVG in
place from ``pruner.charts.allocation_curves_data`` when a slider moves, instead of a Plotly chart re-created on
every move (bench/ui_latency; docs/results.md, issue 13)."""

from pathlib import Path

import streamlit as st

from pruner.charts import allocation_curves_data

_CSS = """
.allocation-curves { position: relative; font-family: inherit; }
.allocation-curves svg { display: block; overflow: visible; }
.allocation-curves .legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin: 2px 0 0 58px; }
.allocation-curves .legend .band { font-size: 13px; display: inline-flex; align-items: center; }
.allocation-curves .legend button { all: unset; cursor: pointer; font-size: 13px; display: inline-flex; align-items: center; }
.allocation-curves span { display: inline-block; width: 14px; height: 3px; margin-right: 6px; vertical-align: middle; }
.allocation-curves .tip { display: none; position: absolute; pointer-events: none; font-size: 12px; line-height: 1.5;
  padding: 6px 8px; border-radius: 4px; background: rgba(250, 250, 250, 0.95); color: #222;
  box-shadow: 0 1px 4px rgba(0, 0, 0, 0.3); white-space: nowrap; z-index: 10; }
"""

_render = st.components.v2.component("allocation_curves", js=(Path(__file__).with_name("_curves.js")).read_text(),
                                     css=_CSS, isolate_styles=False)


def allocation_curves(allocations, block_numel, sparsity: float, lam: float | None, key: str) -> dict:
    """Draw the curves of ``allocations`` (per-block sparsity, and each block's share of the kept weights) and return
    the data drawn."""
    data = allocation_curves_data(allocations, block_numel, sparsity, lam)
    _render(data=data, key=key)
    return data
