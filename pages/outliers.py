"""Outliers: the per-block LOD, a block × layer heatmap, and the score distribution with the M · mean line."""

import streamlit as st

from pruner.allocation import OWL_DEFAULT_M
from pruner.charts import distribution_figure, expert_heatmap_figure, heatmap_figure, lod_figure
from pages._dashboard import page_setup, page_with_stats

st.title("📊 Layerwise outlier distribution")
st.caption("Wanda score A = |W|·‖X‖₂ from calibration activations. A block's outlier ratio is the share of its "
           "scores above M × the block's mean score Ā (OWL, Yin et al. 2024).")
sel, stats = page_with_stats(page_setup())

m = st.slider("Outlier threshold M", 1.0, 20.0, OWL_DEFAULT_M, 0.5, key="outliers_m")
compare = st.multiselect("Also draw M =", [3.0, 5.0, 7.0, 10.0], default=[], key="outliers_more")
ms = [m] + [x for x in compare if x != m]
st.plotly_chart(lod_figure({x: stats.lod(x) for x in ms}, title=f"Outlier ratio per block (M = {', '.join(f'{x:g}' for x in ms)})"),
                width="stretch")
lod = stats.lod(m)
st.caption(f"At M = {m:g}: lowest block {lod.argmin()} ({lod.min():.3%}), highest block {lod.argmax()} "
           f"({lod.max():.3%}), mean {lod.mean():.3%}.")

st.plotly_chart(heatmap_figure(stats.outlier_matrix(m), stats.layers_per_block, m), width="stretch")
if stats.experts_per_block:
    st.subheader("Routed experts")
    st.caption("Each expert's scores come from the calibration tokens its router sent to it (its down_proj from its "
               "own intermediate activations). In the heatmap above, `experts.*` pools all experts of a block.")
    cols = st.columns(2)
    cols[0].plotly_chart(expert_heatmap_figure(stats.expert_matrix(m), f"Outlier ratio per expert at M = {m:g}",
                                               "%"), width="stretch")
    if stats.layer_tokens is not None:
        cols[1].plotly_chart(expert_heatmap_figure(stats.expert_token_share(),
                                                   "Share of each block's routed calibration tokens",
                                                   "% of tokens"), width="stretch")
    else:
        cols[1].info("These statistics predate routed token counts; recompute them on the Model page to see them.")

block = st.select_slider("Distribution of A/Ā for", options=["all blocks"] + list(range(stats.n_blocks)),
                         value="all blocks", key="outliers_block")
edges, counts = stats.ratio_distribution(None if block == "all blocks" else int(block))
where = "all blocks" if block == "all blocks" else f"block {block}"
above = (lod * stats.block_numel).sum() / stats.block_numel.sum() if block == "all blocks" else lod[int(block)]
st.plotly_chart(distribution_figure(edges, counts, m, above,
                                    f"Distribution of scores relative to their block mean, {where}"),
                width="stretch")
