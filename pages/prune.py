"""Prune: a grid of allocators × methods × sparsities as background jobs, with progress, cancel and download."""

import dataclasses
import importlib.util

import streamlit as st

from pages._dashboard import allocator_help, job_store, jobs_panel, page_setup, param_controls, queue, unique_params
from pruner.allocation import ALLOCATORS
from pruner.engine.recover import RECOVER_DEFAULT_STEPS, RecoverSpec
from pruner.jobs.sweep import SweepRequest, executor_for
from pruner.jobs.workflows import PerplexityOptions, RecoverRequest
from pruner.methods import METHODS, NM
from pruner.runs.manifest import current_zip, download_name, list_runs, run_folder, run_zip
from pruner.specs import PruneSpec
from pruner.store.layout import tree_bytes

st.title("✂️ Prune")
sel = page_setup()
if sel is None:
    st.stop()
prefill = st.session_state.get("prune_prefill", {})
SPARSITIES = sorted({0.5, 0.6, 0.7, 0.8, 0.9} | ({round(prefill["sparsity"], 2)} if "sparsity" in prefill else set()))

st.write(f"Prune copies of **{sel.model.name}** (calibration {sel.calib.nsamples} × {sel.calib.seqlen} tokens); "
         "each combination is one background job.")
# the allocators get a row of their own: in a third of it their chips were cut off after the third
allocators = st.multiselect("Allocators", list(ALLOCATORS), default=prefill.get("allocators", ["uniform", "owl"]),
                            format_func=lambda k: ALLOCATORS[k].label, key="grid_allocators", help=allocator_help())
c = st.columns(2)
methods = c[0].multiselect("Methods", list(METHODS), default=["wanda"], key="grid_methods")
sparsities = c[1].multiselect("Target sparsities", SPARSITIES, default=[round(prefill.get("sparsity", 0.7), 2)],
                              format_func=lambda s: f"{s:.0%}", key="grid_sparsities")
# one control per parameter the chosen allocators and methods declare (pruner.core.params), labelled by paper symbol
a_params = unique_params(ALLOCATORS[a] for a in allocators)
m_params = unique_params(METHODS[m] for m in methods)
if a_params or m_params:
    st.caption("Parameters of the chosen allocators and methods (each applies only to the entries that declare it):")
values = param_controls(a_params + m_params, "grid", st.columns(4), prefill.get("params"))
if any(ALLOCATORS[a].learned for a in allocators):
    st.caption("A learned allocator (BESA) learns its allocation first: about 10 s per SmolLM2 block here, cached "
               "per S and parameters.")
c = st.columns(4)
pattern = c[0].selectbox("Pattern", ["unstructured", "2:4", "4:8"],
                         help="N:M keeps N of every M weights; its sparsity replaces the targets above",
                         key="grid_pattern")
ppl = c[1].checkbox("Perplexity afterwards", True, help="WikiText-2 test, token level", key="grid_ppl")
max_chunks = c[2].number_input("chunks of 2048 tokens (0 = all)", 0, 200, 8, key="grid_chunks")
seeds = c[3].number_input("Calibration seeds", 1, 10, 1, key="grid_seeds",
                          help="one run per seed (different calibration windows): the runs form a group whose "
                               "perplexity the Compare page shows with a seed interval; 3 or more to rank allocators")
nm = None if pattern == "unstructured" else NM.parse(pattern)
targets = [nm.sparsity] if nm else sparsities
c = st.columns(2)
stream = c[0].checkbox("Stream blocks from disk", False, key="grid_stream",
                       help="read one decoder block at a time from the checkpoint and write pruned blocks straight "
                            "to the run's shards: memory holds one block instead of the model (same pruned weights)")
from pruner.model.loading import resolve_device  # noqa: E402

on_gpu = resolve_device(sel.model.device).type != "cpu"
offload = c[1].checkbox("Offload activations to CPU memory", False, key="grid_offload", disabled=not on_gpu,
                        help="keep the calibration activations between blocks in host memory instead of on the GPU "
                             "(less GPU memory, the same results)" + ("" if on_gpu else
                                                                      "; the model runs on CPU here, where both are "
                                                                      "the same memory"))
model = dataclasses.replace(sel.model, offload_activations=offload) if offload else sel.model


@st.cache_data(show_spinner=False)
def _planned(model, calib, method: str, streamed: bool, learning: bool) -> tuple[int, str]:
    from pruner.engine.memory_plan import plan_for_spec

    spec = PruneSpec(model=model, calib=calib, allocator="uniform", method=method, sparsity=0.5)
    plan = plan_for_spec(spec, sel.cache_dir, batch_size=4, streamed=streamed, learning=learning)
    return plan.total, plan.text()


if methods:  # memory is planned before a job starts; show the plan so that a refusal is no surprise
    from pruner.engine.memory_plan import available_bytes, gib

    allowed, source = available_bytes()
    # a learned allocator may learn in the job (when not cached yet): planned for, as the worst case
    learning = any(ALLOCATORS[a].learned for a in allocators)
    plans = {m: _planned(model, sel.calib, m, stream, learning) for m in methods}
    st.caption("Planned peak memory per job: " + "; ".join(f"{m} {gib(total)}" for m, (total, _) in plans.items())
               + (f" — allowed {gib(allowed)} ({source})" if allowed else ""))
    for m, (total, text) in plans.items():
        if allowed is not None and total > allowed:
            st.warning(f"{m} would need {text}, more than the {gib(allowed)} allowed: it will be refused. "
                       + ("" if stream else "Tick 'Stream blocks from disk', or ") + "use fewer calibration samples.")
with st.sidebar:
    st.header("Executor")
    ray_address = st.text_input("Ray cluster address", key="ray_address", placeholder="empty: this machine",
                                help="host:port of a Ray cluster's head (or 'auto' on one of its nodes): each job "
                                     "becomes a Ray task there; empty runs the jobs here, one at a time").strip()
    ray_cpus = st.number_input("CPUs per Ray task", 1, 64, 1, key="ray_cpus", disabled=not ray_address)
    if ray_address:
        from pruner.jobs.ray_exec import RAY_MISSING

        if importlib.util.find_spec("ray") is None:
            st.warning(RAY_MISSING)
n_jobs = len(allocators) * len(methods) * len(targets) * int(seeds)
go = st.button(f"Queue {n_jobs} job(s) (allocators × methods × sparsities × seeds)", type="primary", key="grid_go",
               disabled=n_jobs == 0)

if go:
    # one sweep: statistics each calibration set needs first (once), then the cells; a bad cell queues nothing
    try:
        base = PruneSpec(model=model, calib=sel.calib, allocator=allocators[0], method=methods[0], sparsity=targets[0],
                         nm=str(nm) if nm else None)
        sweep = SweepRequest(base, allocators=tuple(allocators), methods=tuple(methods), sparsities=tuple(targets),
                             seeds=int(seeds), params={k: [v] for k, v in values.items()},
                             perplexity=PerplexityOptions(max_chunks or None, stream=stream) if ppl else None,
                             data_dir=sel.data_dir, stream=stream)
        executor = executor_for(ray_address, cpus_per_cell=int(ray_cpus))
        store = job_store(sel)
        existing = {j.id for j in store.list(1000)}
        ids = executor.submit(store, sweep, sel.cache_dir)
        new = [i for i in dict.fromkeys(ids) if i not in existing]
        again = sorted({i for i in ids if i in existing})
        if not new:  # a second click: the same jobs are queued or running already
            st.info(f"Already queued or running: job(s) {', '.join(f'#{i}' for i in again)}; nothing added.")
        else:
            n_cells = len(sweep.specs())
            shared = len(ids) - n_cells
            st.success(f"Queued {n_cells} prune job(s)" + (f" after {shared} shared one(s) (statistics, learned "
                                                            f"allocations)" if shared else "")
                       + f" on the {executor.name} executor"
                       + (f"; {len(again)} of them were queued or running already ("
                          f"{', '.join(f'#{i}' for i in again)}), not added again" if again else "") + ".")
    except ValueError as err:
        st.error(str(err))


jobs_panel(sel, "prune_jobs_done")

st.subheader("Finished runs")
listing = list_runs(sel.cache_dir)
for key, why in listing.broken:
    st.warning(f"Skipped run {key}: {why}")
if not listing.runs:
    st.caption("No runs yet.")
for run in listing.runs:
    c = st.columns([3, 2])  # wide enough for the download label with its size at 1280 px
    p = run.latest_perplexity()
    ppl_text = (f"ppl {p['perplexity']:.2f}" + (" (partial)" if p["partial"] else "")) if p else "no perplexity yet"
    c[0].markdown(f"**{run.label}** · achieved {run.achieved_overall:.2%} · {ppl_text} · `{run.key}`")
    folder = run_folder(run.key, sel.cache_dir)
    if run.weights_dropped:
        c[1].caption("weights dropped after evaluation (`python -m pruner prune ... --force` restores them)")
        continue
    built = current_zip(folder)
    size = (f"{built.stat().st_size / 2**20:,.0f} MB" if built is not None else
            f"{tree_bytes(folder) / 2**20:,.0f} MB unzipped")
    name = download_name(run)
    c[1].download_button(f"Download zip ({size})", data=lambda folder=folder: open(run_zip(folder), "rb").read(),
                         file_name=name, mime="application/zip", key=f"dl-{run.key}",
                         help=f"{name}: the Hugging Face folder (loads with "
                              "AutoModelForCausalLM.from_pretrained) and manifest.json; compressed when first asked "
                              "for (a pruned model's zeros shrink it about 3× at 70%)",
                         on_click="ignore")  # a rerun here would race the zip being made (see JOBS_REFRESH_*)
    if not run.is_recovery and c[1].button("LoRA recovery", key=f"rec-{run.key}",
                                           help=f"fine-tune LoRA adapters for {RECOVER_DEFAULT_STEPS} steps on "
                                                "calibration text (adapters kept separate, so the zeros stay); "
                                                "stored as a new run with perplexity before and after"):
        chunks = p["chunks"] if p and p["partial"] else None
        queue(sel, RecoverRequest(RecoverSpec(run.key), PerplexityOptions(chunks), data_dir=sel.data_dir))
        st.success(f"Queued the LoRA recovery of {run.key}.")
