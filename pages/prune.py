"""Prune: a grid of allocators × methods × sparsities as background jobs, with progress, cancel and download."""

import itertools
from dataclasses import asdict

import streamlit as st

from pruner.allocation import ALLOCATORS, BESA_DEFAULT_BETA, OWL_DEFAULT_LAMBDA, OWL_DEFAULT_M
from pruner.dashboard import job_store, jobs_panel, page_setup
from pruner.jobs import submit
from pruner.methods import METHODS
from pruner.recover import RECOVER_DEFAULT_STEPS, RecoverSpec
from pruner.specs import PruneSpec, spec_to_dict
from pruner.store import list_runs, run_dir, run_zip

st.title("✂️ Prune")
sel = page_setup()
if sel is None:
    st.stop()
prefill = st.session_state.get("prune_prefill", {})
SPARSITIES = sorted({0.5, 0.6, 0.7, 0.8, 0.9} | ({round(prefill["sparsity"], 2)} if "sparsity" in prefill else set()))

with st.form("grid"):
    st.write(f"Prune copies of **{sel.model.name}** (calibration {sel.calib.nsamples} × {sel.calib.seqlen} tokens); "
             "each combination is one background job.")
    c = st.columns(3)
    allocators = c[0].multiselect("Allocators", list(ALLOCATORS), default=prefill.get("allocators", ["uniform", "owl"]),
                                  format_func=lambda k: ALLOCATORS[k].label, key="grid_allocators")
    methods = c[1].multiselect("Methods", list(METHODS), default=["wanda"], key="grid_methods")
    sparsities = c[2].multiselect("Target sparsities", SPARSITIES, default=[round(prefill.get("sparsity", 0.7), 2)],
                                  format_func=lambda s: f"{s:.0%}", key="grid_sparsities")
    c = st.columns(4)
    lam = c[0].number_input("λ (OWL)", 0.0, 0.5, float(prefill.get("lam", OWL_DEFAULT_LAMBDA)), 0.01, key="grid_lam")
    m = c[0].number_input("M (OWL)", 0.5, 50.0, float(prefill.get("m", OWL_DEFAULT_M)), 0.5, key="grid_m")
    beta = c[1].number_input("β (BESA)", 0.1, 1000.0, BESA_DEFAULT_BETA, 5.0, key="grid_beta",
                             help="weight of BESA's sparsity penalty ((ŝ − S)/S)²; BESA learns its allocation "
                                  "first (about 10 s per SmolLM2 block here, cached per S and β)")
    pattern = c[2].selectbox("Pattern", ["unstructured", "2:4", "4:8"],
                             help="N:M keeps N of every M weights; its sparsity replaces the targets above",
                             key="grid_pattern")
    ppl = c[3].checkbox("Perplexity afterwards", True, help="WikiText-2 test, token level", key="grid_ppl")
    max_chunks = c[3].number_input("chunks of 2048 tokens (0 = all)", 0, 200, 8, key="grid_chunks")
    # a form does not rerun while it is edited, so the button cannot show a live count; the confirmation does
    go = st.form_submit_button("Queue jobs (allocators × methods × sparsities)", type="primary", key="grid_go")

if go:
    store = job_store(sel)
    targets = [None] if pattern != "unstructured" else sparsities
    queued, errors = 0, []
    for alloc, method, S in itertools.product(allocators, methods, targets):
        nm = None if pattern == "unstructured" else pattern
        try:
            spec = PruneSpec(model=sel.model, calib=sel.calib, allocator=alloc, method=method,
                             sparsity=S if nm is None else 1 - int(nm.split(":")[0]) / int(nm.split(":")[1]),
                             lam=lam, m=m, nm=nm, beta=beta)
            submit(store, "prune", {"spec": spec_to_dict(spec), "ppl": ppl, "max_chunks": max_chunks or None,
                                    "data_dir": sel.data_dir}, cache_dir=sel.cache_dir)
            queued += 1
        except ValueError as err:
            errors.append(f"{alloc} × {method} × {S}: {err}")
    if queued:
        st.success(f"Queued {queued} job(s).")
    for e in errors:
        st.error(e)


jobs_panel(sel, "prune_jobs_done")

st.subheader("Finished runs")
runs = list_runs(sel.cache_dir)
if not runs:
    st.caption("No runs yet.")
for run in runs:
    c = st.columns([7, 2])
    ppl_metrics = [v for k, v in run.get("metrics", {}).items() if k.startswith("perplexity")]
    ppl_text = f"ppl {ppl_metrics[-1]['perplexity']:.2f}" + (" (partial)" if ppl_metrics[-1]["partial"] else "") \
        if ppl_metrics else "no perplexity yet"
    c[0].markdown(f"**{run['label']}** · achieved {run['achieved']['overall']:.2%} · {ppl_text} · `{run['key']}`")
    folder = run_dir(run["key"], sel.cache_dir)
    c[1].download_button("Download zip", data=lambda folder=folder: open(run_zip(folder), "rb").read(),
                         file_name=f"{run['key']}.zip", mime="application/zip", key=f"dl-{run['key']}",
                         on_click="ignore")  # a rerun here would race the zip being made (see JOBS_REFRESH_*)
    if "recovery" not in run and c[1].button("LoRA recovery", key=f"rec-{run['key']}",
                                            help=f"fine-tune LoRA adapters for {RECOVER_DEFAULT_STEPS} steps on "
                                                 "calibration text (adapters kept separate, so the zeros stay); "
                                                 "stored as a new run with perplexity before and after"):
        chunks = ppl_metrics[-1]["chunks"] if ppl_metrics and ppl_metrics[-1]["partial"] else None
        submit(job_store(sel), "recover", {"recover": asdict(RecoverSpec(run["key"])), "ppl": True,
                                           "max_chunks": chunks, "data_dir": sel.data_dir}, cache_dir=sel.cache_dir)
        st.success(f"Queued the LoRA recovery of {run['key']}.")
