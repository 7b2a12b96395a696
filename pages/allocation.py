"""Allocation: slide S, λ and M and see OWL next to uniform, ER, global and OWL-inverse, from cached statistics."""

import json

import pandas as pd
import streamlit as st

from pruner.allocation import ALLOCATORS, OWL_DEFAULT_LAMBDA, OWL_DEFAULT_M, allocate, owl_lambda_max
from pruner.charts import allocation_comparison_figure
from pruner.dashboard import page_setup, page_with_stats

st.title("🎚️ Allocation")
st.caption("Every curve is recomputed from the cached statistics when a slider moves: no model forward.")
sel, stats = page_with_stats(page_setup())

c = st.columns(3)
S = c[0].slider("Target sparsity S", 0.05, 0.95, 0.70, 0.05, key="alloc_S")
lam = c[1].slider("λ (OWL's spread: max − min sparsity = 2λ)", 0.0, 0.5, OWL_DEFAULT_LAMBDA, 0.01, key="alloc_lam")
m = c[2].slider("Outlier threshold M", 1.0, 20.0, OWL_DEFAULT_M, 0.5, key="alloc_M")
shown = st.multiselect("Allocators", list(ALLOCATORS), default=list(ALLOCATORS), key="alloc_shown",
                       format_func=lambda k: ALLOCATORS[k].label)

lod = stats.lod(m)
allocations, problems = [], []
for name in shown:
    try:
        allocations.append(allocate(name, stats, S, lam=lam, m=m))
    except ValueError as err:
        if name in ("owl", "owl_inverse"):
            allowed = owl_lambda_max(lod, S, inverse=name == "owl_inverse")
            problems.append(f"**{ALLOCATORS[name].label}**: λ = {lam:.2f} is too wide for S = {S:.2f} on this model; "
                            f"choose λ < {allowed:.3f} (at M = {m:g}).")
        else:
            problems.append(f"**{ALLOCATORS[name].label}**: {err}")
for p in problems:
    st.warning(p)
if allocations:
    st.plotly_chart(allocation_comparison_figure(allocations, stats.block_numel, S,
                                                 lam if any(a.allocator.startswith("owl") for a in allocations) else None),
                    width="stretch", key="alloc_chart")
    table = pd.DataFrame({ALLOCATORS[a.allocator].label: a.block_sparsity for a in allocations})
    table.index.name = "block"
    with st.expander("Per-block sparsities (table)"):
        st.dataframe(table.style.format("{:.4f}"), width="stretch")
    export = {a.allocator: a.to_dict(stats.layer_names, stats.layer_block) for a in allocations}
    c = st.columns(3)
    c[0].download_button("Download CSV (per block)", table.to_csv().encode(), "allocation.csv", "text/csv")
    c[1].download_button("Download JSON (per block and layer)", json.dumps(export, indent=2).encode(),
                         "allocation.json", "application/json")
    if c[2].button("✂️ Prune with this allocation", type="primary", key="alloc_to_prune"):
        st.session_state["prune_prefill"] = {"allocators": [a.allocator for a in allocations], "sparsity": S,
                                             "lam": lam, "m": m}
        st.switch_page("pages/prune.py")
