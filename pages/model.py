"""Model: what is loaded, and its outlier statistics (computed as a background job)."""

import streamlit as st

from pages._dashboard import cached_stats, dense_model, job_row, job_store, keep_workers, page_setup, queue
from pruner.models import model_summary
from pruner.workflows import StatsRequest

st.title("🧠 Model")
sel = page_setup()
if sel is None:
    st.stop()

try:
    lm = dense_model(sel.model, sel.cache_dir)
except (ValueError, OSError) as err:
    st.error(f"Could not load {sel.model.name}: {err}")
    st.stop()
s = model_summary(lm)
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


def stats_jobs(store):
    """This selection's statistics jobs, newest first (jobs this code cannot read are not this selection's)."""
    def mine(job):
        try:
            return job.kind == StatsRequest.kind and job.request.spec.key() == key
        except ValueError:
            return False

    return [j for j in store.list(200) if mine(j)]


mine = stats_jobs(store)
active = [j for j in mine if j.state in ("queued", "running")]
st.info(f"Not computed yet for this calibration set ({sel.calib.nsamples} × {sel.calib.seqlen} tokens). "
        "One pass over the model, block by block.")
if not active and st.button("Compute outlier statistics", type="primary", key="compute_stats"):
    queue(sel, StatsRequest(sel.stats_spec))
    st.rerun()


@st.fragment(run_every=1.0)
def progress():
    store = job_store(sel)
    keep_workers(store, sel)
    jobs = stats_jobs(store)
    for job in jobs[:3]:
        job_row(job)
    if jobs and jobs[0].state == "done":
        st.rerun(scope="app")


if mine or active:
    progress()
