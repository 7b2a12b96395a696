"""Outliers: the per-block LOD of the bundled model and the OWL allocation it implies."""

import os

import streamlit as st

from pruner import api
from pruner.allocation import OWL_DEFAULT_LAMBDA, OWL_DEFAULT_M, allocate, owl_lambda_max
from pruner.charts import allocation_figure, lod_figure
from pruner.models import DEFAULT_MODEL, available_bundled
from pruner.specs import CALIB_PRESETS, DEFAULT_CALIB_PRESET, CalibSpec, ModelSpec, StatsSpec
from pruner.store import default_data_dir

st.title("Layerwise outlier distribution")
st.caption("Wanda score A = |W|·‖X‖₂ from calibration activations; a block's outlier ratio is the share of its "
           "scores above M × the block's mean score (OWL, Yin et al. 2024).")

bundled = available_bundled()
with st.sidebar:
    model_name = st.selectbox("Model", bundled, index=bundled.index(DEFAULT_MODEL) if DEFAULT_MODEL in bundled else 0)
    preset = st.selectbox("Calibration", list(CALIB_PRESETS), index=list(CALIB_PRESETS).index(DEFAULT_CALIB_PRESET),
                          format_func=lambda k: f"{k}: {CALIB_PRESETS[k][0]} × {CALIB_PRESETS[k][1]} tokens of C4")
data_dir = os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
cache_dir = os.environ.get("PRUNER_CACHE_DIR") or None
spec = StatsSpec(model=ModelSpec(model_name), calib=CalibSpec.preset(preset, data_dir=data_dir))

stats = api.load_cached_stats(spec, cache_dir)
if stats is None:
    st.info(f"No outlier statistics yet for {model_name} with the '{preset}' calibration set.")
    if st.button("Compute outlier statistics", type="primary"):
        bar = st.progress(0.0, text="loading model and calibration data")
        stats = api.get_stats(spec, cache_dir, progress=lambda done, total: bar.progress(done / total,
                                                                             text=f"block {done} / {total}"))
        bar.empty()
    else:
        st.stop()

summary = stats.meta.get("summary", {})
st.caption(f"{summary.get('architecture', '')}, {stats.n_blocks} blocks, {summary.get('prunable_parameters', 0):,} "
           f"prunable weights ({summary.get('weights', '')}); statistics computed in {stats.meta.get('seconds', 0):.0f} s")

c1, c2, c3 = st.columns(3)
m = c1.slider("Outlier threshold M", 1.0, 20.0, OWL_DEFAULT_M, 0.5)
sparsity = c2.slider("Target sparsity S", 0.05, 0.95, 0.70, 0.05)
lam_cap = min(0.5, owl_lambda_max(stats.lod(m), sparsity))
lam = c3.slider("λ (max deviation from S)", 0.0, 0.5, OWL_DEFAULT_LAMBDA, 0.01)

st.plotly_chart(lod_figure({m: stats.lod(m)}, title=f"Outlier ratio per block at M = {m:g}"), width="stretch")
if lam >= lam_cap:
    st.warning(f"λ = {lam:.2f} is too wide for S = {sparsity:.2f} on this model: choose λ < {lam_cap:.3f}.")
else:
    allocs = [allocate(name, stats, sparsity, lam=lam, m=m) for name in ("uniform", "owl")]
    st.plotly_chart(allocation_figure(allocs, sparsity, lam), width="stretch")
