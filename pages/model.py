"""Model: what is loaded, and its outlier statistics (computed as a background job)."""

import streamlit as st

from pruner import api
from pruner.dashboard import cached_stats, dense_model, job_row, job_store, keep_workers, page_setup
from pruner.jobs import submit
from pruner.specs import spec_to_dict

st.title("🧠 Model")
sel = page_setup()
if sel is None:
    st.stop()

try:
    lm = dense_model(sel.model, sel.cache_dir)
except (ValueError, OSError) as err:
    st.error(f"Could not load {sel.model.name}: {err}")
    st.stop()
s = api.model_summary(lm)
st.markdown(f"**{sel.model.name}** · `{s['architecture']}` · weights **{s['weights']}**, held as {s['dtype']}, "
            f"computed on {s['device']}")
c = st.columns(3)
c[0].metric("Transformer blocks", s["blocks"])
c[1].metric("Prunable weights", f"{s['prunable_parameters'] / 1e6:.1f} M",
            help="embeddings, norms and lm_head are never pruned")
c[2].metric("All parameters", f"{s['total_parameters'] / 1e6:.1f} M")
st.caption(f"Blocks found at `{s['blocks_path']}`. Prunable layers per block: "
           + ", ".join(f"`{n}`" for n in s["layer_names"]))

st.subheader("Outlier statistics")
stats = cached_stats(sel)
if stats is not None:
    st.success(f"Cached: {sel.calib.nsamples} × {sel.calib.seqlen} C4 tokens, seed {sel.calib.seed}, computed in "
               f"{stats.meta.get('seconds', 0):.1f} s. The Outliers and Allocation pages use them.")
    st.stop()

store = job_store(sel)
key = sel.stats_spec.key()
mine = [j for j in store.list(200) if j.kind == "stats" and j.payload.get("key") == key]
active = [j for j in mine if j.state in ("queued", "running")]
st.info(f"Not computed yet for this calibration set ({sel.calib.nsamples} × {sel.calib.seqlen} tokens). "
        "One pass over the model, block by block.")
if not active and st.button("Compute outlier statistics", type="primary", key="compute_stats"):
    submit(store, "stats", {"spec": spec_to_dict(sel.stats_spec), "key": key}, cache_dir=sel.cache_dir)
    st.rerun()


@st.fragment(run_every=1.0)
def progress():
    store = job_store(sel)
    keep_workers(store, sel)
    jobs = [j for j in store.list(200) if j.kind == "stats" and j.payload.get("key") == key]
    for job in jobs[:3]:
        job_row(job)
    if jobs and jobs[0].state == "done":
        st.rerun(scope="app")


if mine or active:
    progress()
