"""Allocation: slide S, λ and M and see OWL next to uniform, ER, global, OWL-inverse and AlphaPruning, from cached
statistics; BESA's learned per-layer sparsities (learned once per S in the background) beside OWL's as heatmaps."""

import json

import numpy as np
import pandas as pd
import streamlit as st

from pruner import api
from pruner.allocation import (ALLOCATORS, BESA_DEFAULT_BETA, OWL_DEFAULT_LAMBDA, OWL_DEFAULT_M, STATS_ALLOCATORS,
                               allocate, owl_lambda_max)
from pruner.charts import allocation_comparison_figure, layer_sparsity_heatmap_figure
from pruner.dashboard import job_store, jobs_panel, page_setup, page_with_stats
from pruner.jobs import submit
from pruner.specs import spec_to_dict

st.title("🎚️ Allocation")
st.caption("Every curve is recomputed from the cached statistics when a slider moves: no model forward.")
sel, stats = page_with_stats(page_setup())

c = st.columns(3)
S = c[0].slider("Target sparsity S", 0.05, 0.95, 0.70, 0.05, key="alloc_S")
lam = c[1].slider("λ (OWL's spread: max − min sparsity = 2λ)", 0.0, 0.5, OWL_DEFAULT_LAMBDA, 0.01, key="alloc_lam")
m = c[2].slider("Outlier threshold M", 1.0, 20.0, OWL_DEFAULT_M, 0.5, key="alloc_M")
shown = st.multiselect("Allocators", list(ALLOCATORS), default=list(ALLOCATORS), key="alloc_shown",
                       format_func=lambda k: ALLOCATORS[k].label)
beta = BESA_DEFAULT_BETA
besa = api.cached_besa(sel.stats_spec, S, beta, sel.cache_dir) if "besa" in shown else None

lod = stats.lod(m)
allocations, problems = [], []
for name in shown:
    if name not in STATS_ALLOCATORS:  # learned (BESA): shown once learned for this S, see below
        if besa is not None:
            allocations.append(allocate(name, stats, S, beta=beta, learned=api.besa_layer_sparsity(besa, stats)))
        continue
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

if "besa" in shown:
    st.subheader("BESA: sparsities learned per layer")
    st.caption(f"Per block, each linear layer's sparsity is learned so that the block's output stays closest to "
               f"the dense block's on the calibration set while the block's mean is S (β = {beta:g} weighs the "
               f"sparsity penalty). OWL gives every layer of a block the same sparsity; BESA moves them apart.")
    if besa is None:
        st.info(f"BESA has not been learned for S = {S:.0%} on this model and calibration set yet. It runs every "
                f"block forward and backward a few times (about 10 s per SmolLM2 block with the cpu preset here).")
        if st.button(f"Learn BESA at S = {S:.0%} in the background", key="alloc_besa_go"):
            submit(job_store(sel), "stats", {"spec": spec_to_dict(sel.stats_spec),
                                             "besa": {"sparsity": S, "beta": beta}}, cache_dir=sel.cache_dir)
            st.success("Queued: the heatmap appears here when the job is done.")
        jobs_panel(sel, "alloc_jobs_done")
    else:
        besa_alloc = next(a for a in allocations if a.allocator == "besa")
        pair = [besa_alloc]
        if "owl" in shown and any(a.allocator == "owl" for a in allocations):
            pair.insert(0, next(a for a in allocations if a.allocator == "owl"))
        values = np.concatenate([a.layer_sparsity for a in pair]) * 100
        cols = st.columns(len(pair))
        for col, a in zip(cols, pair):
            col.plotly_chart(layer_sparsity_heatmap_figure(a, stats.layer_names, stats.layer_block,
                                                           (float(values.min()), float(values.max()))),
                             width="stretch", key=f"alloc_heat_{a.allocator}")
        gain = 1 - np.mean(besa["error_hard"]) / np.mean(besa["error_uniform"])
        st.caption(f"Learned in {besa['seconds']:.0f} s ({besa['epochs']} epochs, {besa['steps_per_block']} "
                   f"optimiser steps per block). Block reconstruction error with hard Wanda masks, averaged over blocks: "
                   f"{np.mean(besa['error_hard']):.4f} with BESA's sparsities vs {np.mean(besa['error_uniform']):.4f} "
                   f"with S in every layer ({gain:.0%} lower).")
