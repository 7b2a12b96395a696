"""Allocation: slide S, λ and M and see OWL next to uniform, ER, global, OWL-inverse and AlphaPruning, from cached
statistics; BESA's learned per-layer sparsities (learned once per S in the background) beside OWL's as heatmaps."""

import json

import numpy as np
import pandas as pd
import streamlit as st

from pages._curves import allocation_curves
from pages._dashboard import (JOBS_SHOWN, allocator_help, job_store, jobs_panel, page_setup, page_with_stats, param_controls,
                              queue, unique_params)
from pages._search import search_caption
from pruner.allocation import ALLOCATORS, SEARCH_GENERATIONS, allocate, owl_lambda_max
from pruner.charts import layer_sparsity_heatmap_figure, predicted_map_figure, search_progress_figure
from pruner.core.params import params_text
from pruner.engine import artifacts
from pruner.jobs.queue import ACTIVE_STATES
from pruner.jobs.workflows import LearnRequest, PerplexityOptions, PredictorRequest, PruneRequest
from pruner.predictor.cache import table_for
from pruner.predictor.compounding import COMPOUNDING_PROBES
from pruner.predictor.search import SEARCH_MEASURED, SEARCH_STEP, saved_search, saved_searches
from pruner.predictor.table import PredictorSpec
from pruner.specs import PruneSpec

st.title("🎚️ Allocation")
st.caption("Every curve is recomputed from the cached statistics when a control moves: no model forward.")
sel, stats = page_with_stats(page_setup())
#: Chunks of the WikiText-2 test set a verification measures (a partial evaluation, labelled so).
VERIFY_CHUNKS = 8
MEASURED = "measured perplexity"
#: OWL's (λ, M) points of the predicted-perplexity map.
MAP_LAMBDAS = np.round(np.arange(0.0, 0.205, 0.02), 3)
MAP_MS = np.array([2.0, 3.0, 5.0, 7.0, 10.0, 15.0])


@st.cache_resource(show_spinner=False, max_entries=16)
def _owl_map(table_key: str, table_created: str, stats_key: str, sparsity: float, _damage, _stats):
    """The figure of OWL's predicted perplexity over (M, λ) at ``sparsity`` (NaN, blank, where λ is too wide or
    beyond the table's grid). It depends on S and the table only, not on the λ and M sliders, so a slider move reuses
    it, figure included (keyed by the table's key and creation time, so a rebuilt table is not shadowed)."""
    grid = np.full((len(MAP_MS), len(MAP_LAMBDAS)), np.nan)
    for i, m in enumerate(MAP_MS):
        for j, lam_ in enumerate(MAP_LAMBDAS):
            try:
                grid[i, j] = _damage.predict(allocate("owl", _stats, sparsity, lam=lam_, m=m).block_sparsity).perplexity
            except ValueError:
                pass  # λ too wide here, or beyond the table's grid: left blank
    return predicted_map_figure(MAP_LAMBDAS, MAP_MS, grid, sparsity)


@st.cache_data(show_spinner=False, max_entries=512)
def _prediction(table_key: str, table_created: str, block_sparsity: bytes, layer_sparsity: bytes,
                _damage) -> tuple[float, str]:
    """(predicted perplexity, its 95% interval as text, or why there is none) of one allocation, remembered: a λ move
    changes only OWL's curves, so the other allocators' predictions are reused (keyed by the table and the
    allocation's sparsities)."""
    try:
        p = _damage.predict_allocation(np.frombuffer(block_sparsity), np.frombuffer(layer_sparsity))
        return p.perplexity, f"[{p.low:.1f}, {p.high:.1f}]"
    except ValueError as err:
        return float("nan"), str(err)


def _queued(message: str) -> None:
    """After a job was queued from inside the what-if fragment: rerun the whole page, so that the job list below
    shows the job at once, and say so above the controls."""
    st.session_state["alloc_queued"] = message
    st.rerun()


# A slider move reruns only this fragment (controls, curves, predictions, map, learned heatmaps), not the sidebar
# and the job list: the browser then redraws only what the move changed (bench/ui_latency).
@st.fragment
def what_if():
    if "alloc_queued" in st.session_state:
        st.success(st.session_state.pop("alloc_queued"))
    _what_if()


def _what_if():
    # the allocators get a row of their own: beside the slider their chips were cut off after the sixth
    shown = st.multiselect("Allocators", list(ALLOCATORS), default=list(ALLOCATORS), key="alloc_shown",
                           format_func=lambda k: ALLOCATORS[k].label, help=allocator_help())
    S = st.columns([1, 2])[0].slider("Target sparsity S", 0.05, 0.95, 0.70, 0.05, key="alloc_S")
    # one control per parameter the shown allocators declare (pruner.core.params), labelled by its paper symbol
    closed_form = [n for n in shown if not ALLOCATORS[n].learned]

    def valid(name, value, current) -> bool:  # every shown closed-form allocator with this parameter accepts it
        for n in closed_form:
            a = ALLOCATORS[n]
            if any(p.name == name for p in a.params):
                try:
                    allocate(n, stats, S, **a.pick({**current, name: value}))
                except ValueError:
                    return False
        return True

    # each slider ends where the allocations are still valid at this S on this model (OWL's λ: 0.22 at S = 70%
    # on SmolLM2 with OWL-inverse shown; the declared 0.49 drew a refusal instead of curves)
    def valid_key(name, current):  # what ``valid`` reads: the model, S and the parameters checked with this one
        others = sorted({q.name for n in closed_form for q in ALLOCATORS[n].params
                         if any(p.name == name for p in ALLOCATORS[n].params)} - {name})
        return sel.stats_spec.key(), S, tuple(closed_form), name, tuple((o, current[o]) for o in others)

    values = param_controls(unique_params(ALLOCATORS[n] for n in shown), "alloc", st.columns(4), sliders=True,
                            valid=valid, valid_key=valid_key)
    learned_results = {name: artifacts.cached_learned(sel.stats_spec, name, S, ALLOCATORS[name].pick(values), sel.cache_dir)
                       for name in shown if ALLOCATORS[name].learned}

    allocations, problems = [], []
    for name in shown:
        a = ALLOCATORS[name]
        params = a.pick(values)
        try:
            if a.learned:  # shown once learned for this S and these parameters, see below
                if learned_results[name] is not None:
                    allocations.append(allocate(name, stats, S, learned=artifacts.learned_layer_sparsity(learned_results[name],
                                                                                                   stats), **params))
                elif name == "search" and (saved := saved_search(sel.stats_spec, S, params, sel.cache_dir)):
                    # a running (or interrupted) search: its best allocation so far
                    block = np.asarray(saved["state"]["units"]) * SEARCH_STEP
                    allocations.append(allocate(name, stats, S, learned=block[np.asarray(stats.layer_block)],
                                                **params))
                continue
            allocations.append(allocate(name, stats, S, **params))
        except ValueError as err:
            if name in ("owl", "owl_inverse") and "too wide" in str(err):
                allowed = owl_lambda_max(stats.lod(params["m"]), S, inverse=name == "owl_inverse")
                problems.append(f"**{a.label}**: λ = {params['lam']:.2f} is too wide for S = {S:.2f} on this model; "
                                f"choose λ < {allowed:.3f} (at M = {params['m']:g}).")
            else:
                problems.append(f"**{a.label}**: {err}")
    for p in problems:
        st.warning(p)
    lam = values.get("lam")
    if allocations:
        allocation_curves(allocations, stats.block_numel, S,
                          lam if any(a.allocator.startswith("owl") for a in allocations) else None, key="alloc_chart")
        table = pd.DataFrame({ALLOCATORS[a.allocator].label: a.block_sparsity for a in allocations})
        table.index.name = "block"
        # formatted in the browser (column_config), not by a pandas Styler, and the downloads made when clicked:
        # both ran on every slider move and cost about 60 ms of it here (bench/ui_latency)
        with st.expander("Per-block sparsities (table)"):
            st.dataframe(table, width="stretch",
                         column_config={c: st.column_config.NumberColumn(format="%.4f") for c in table.columns})
        c = st.columns(3)
        c[0].download_button("Download CSV (per block)", lambda: table.to_csv().encode(), "allocation.csv",
                             "text/csv")
        c[1].download_button("Download JSON (per block and layer)",
                             lambda: json.dumps({a.allocator: a.to_dict(stats.layer_names, stats.layer_block)
                                                 for a in allocations}, indent=2).encode(),
                             "allocation.json", "application/json")
        shown = [a.allocator for a in allocations]
        chosen = c[2].selectbox("Allocation to prune", shown, index=shown.index("owl") if "owl" in shown else 0,
                                format_func=lambda k: ALLOCATORS[k].label, key="alloc_to_prune_which",
                                help="The Prune page opens with this allocator and uniform (the reference) at this "
                                     "S and these parameters; add others there.")
        if c[2].button("✂️ Prune with this allocation", type="primary", key="alloc_to_prune"):
            st.session_state["prune_prefill"] = {"allocators": list(dict.fromkeys([chosen, "uniform"])),
                                                 "sparsity": S, "params": values}
            st.switch_page("pages/prune.py")

    # what each allocation would cost, before pruning it: the damage-table predictor (pruner.predictor.table)
    st.subheader("Predicted perplexity")
    st.caption("Predictions come from a **damage table**, measured once per model and S: each block pruned alone at "
               "a few sparsities, scored on held-out text (WikiText-2 validation, never the test split). An "
               "allocation's predicted perplexity adds up the damages of its blocks, with a fitted correction for "
               "how they compound. Building it takes minutes; each prediction then takes microseconds.")
    # the table measured around this S ranks allocations at S best; the dense-reference one serves any S meanwhile
    predictor = PredictorSpec(sel.stats_spec, around=S)


    def _verify_spec(allocator: str) -> PruneSpec:
        """The prune a verification runs: this allocation with the method the predictor's table was built with."""
        return PruneSpec(model=sel.model, calib=sel.calib, allocator=allocator, method=predictor.method, sparsity=S,
                         allocator_params=ALLOCATORS[allocator].pick(values))


    def _measured(spec: PruneSpec) -> dict | None:
        """The stored run's latest perplexity, if that run exists and was evaluated."""
        from pruner.runs.manifest import BadRun, read_run, run_exists, run_folder

        if not run_exists(spec.key(), sel.cache_dir):
            return None
        try:
            return read_run(run_folder(spec.key(), sel.cache_dir)).latest_perplexity()
        except BadRun:
            return None

    damage = table_for(sel.stats_spec, S, sel.cache_dir)
    if damage is None or abs(damage.anchor - S) > 1e-6:
        st.info(("No damage table for this model and calibration set yet. " if damage is None else
                 "The predictions below come from the dense-reference table, which ranks allocations poorly at high S "
                 "(docs/results.md). ") +
                f"A table around S = {S:.0%} prunes every block at {S:.0%}, then moves each block alone to "
                f"{len(predictor.grid)} other sparsities and measures the loss on {predictor.windows} held-out "
                "WikiText-2 validation windows (never the test split); about 11 minutes for SmolLM2 on 2 CPU cores, "
                "once per S.")
        if st.button(f"Build the predictor around S = {S:.0%} in the background", key="alloc_predictor_build"):
            queue(sel, PredictorRequest(predictor, data_dir=sel.data_dir))
            _queued(f"Queued the predictor around S = {S:.0%}: predictions appear here when the job is done.")
    if damage is not None:
        rows = []
        for x in allocations:
            measured = _measured(_verify_spec(x.allocator))
            row = {"allocator": ALLOCATORS[x.allocator].label}
            row["predicted perplexity"], row["95% interval (held-out windows)"] = _prediction(
                damage.meta.get("key", ""), damage.meta.get("created", ""),
                np.asarray(x.block_sparsity, dtype=np.float64).tobytes(),
                np.asarray(x.layer_sparsity, dtype=np.float64).tobytes(), damage)
            row[MEASURED] = measured["perplexity"] if measured else float("nan")
            row["measured on"] = (f"test, first {measured['chunks']} of {measured['chunks_total']} chunks"
                                  if measured and measured["partial"] else "whole test set" if measured else "not yet")
            rows.append(row)
        st.dataframe(pd.DataFrame(rows), width="stretch", hide_index=True,
                     column_config={name: st.column_config.NumberColumn(format="%.1f")
                                    for name in ("predicted perplexity", MEASURED)})
        # verify: the real prune and evaluation of one shown allocation, queued; its measurement joins the table above
        c = st.columns([2, 1])
        pick = c[0].selectbox("Verify one allocation: prune it with "
                              f"{predictor.method} and measure WikiText-2 test perplexity (first {VERIFY_CHUNKS} chunks)",
                              [x.allocator for x in allocations], format_func=lambda k: ALLOCATORS[k].label,
                              key="alloc_verify_pick")
        if c[1].button("✔️ Verify in the background", key="alloc_verify", disabled=pick is None):
            queue(sel, PruneRequest(_verify_spec(pick), PerplexityOptions(VERIFY_CHUNKS), data_dir=sel.data_dir))
            _queued(f"Queued the prune of {ALLOCATORS[pick].label} at S = {S:.0%}: its measured perplexity appears "
                       "in the table when the job is done.")
        st.caption(f"Reference: {damage.dense_perplexity:.2f} on the held-out windows, for "
                   f"{damage.reference_text()}; the damages of the blocks are added. "
                   + (f"Compounding (fitted on {COMPOUNDING_PROBES} random allocations measured whole): "
                      f"γ₊ = {damage.gamma[0]:.3f} on the products of pairs of blocks' damages, γ₋ = "
                      f"{damage.gamma[1]:.3f} on those of their gains. On SmolLM2, tables around S ranked 25–26 measured allocations with Spearman 0.93 at "
                      "50% and 0.91 at 70% with the fit (0.85 without: allocations that prune many consecutive early "
                      "blocks hard collapse, their damages compound). " if damage.anchor else
                      "On SmolLM2 the dense-reference table ranked measured allocations only moderately at 50% "
                      "(Spearman 0.57) and not at 70% (0.19): a block pruned alone in a dense model overstates what "
                      "pruning the late blocks costs inside a pruned one. ")
                   + "Verify a choice before relying on it (docs/results.md)."
                   + (" The predictor-optimal allocation is chosen by minimising this very prediction, so its own "
                      "prediction is the most optimistic of all (on SmolLM2 at 70% with the compounding fit: "
                      "predicted 154, measured 367, the geometric mean of three seeds on the first 8 test chunks, "
                      "level with the best formula allocator, ATP): rank by it, do not quote it."
                      if any(x.allocator == "predicted" for x in allocations) else ""))
        if "owl" in shown:
            st.plotly_chart(_owl_map(damage.meta.get("key", ""), damage.meta.get("created", ""),
                                     sel.stats_spec.key(), S, damage, stats), width="stretch", key="alloc_predicted_map")

    # a learned allocation's per-layer sparsities as a heatmap beside OWL's, drawn on request: every shown heatmap
    # is redrawn from scratch on each slider move (Streamlit re-creates a changed Plotly chart), which costs about as
    # much as the curves themselves
    heatmaps = any(r is not None for r in learned_results.values()) and st.toggle(
        "Per-layer heatmaps of the learned allocations, beside OWL's", value=False, key="alloc_heatmaps",
        help="Off by default so that the curves follow the sliders quickly; each heatmap is redrawn on every move.")
    for name, result in learned_results.items():
        a = ALLOCATORS[name]
        st.subheader(f"{a.label}: sparsities learned per {a.granularity}")
        st.caption(f"Per block, each linear layer's sparsity is learned so that the block's output stays closest to "
                   f"the dense block's on the calibration set while the block's mean is S ({a.description}). OWL gives "
                   f"every layer of a block the same sparsity; a learned allocation moves them apart." if name == "besa"
                   else f"{a.label}: {a.description}.")
        if name == "search":
            _search_report(result, values, S)
        if result is None:
            cost = {"besa": "It runs every block forward and backward a few times (about 10 s per SmolLM2 block with "
                            "the cpu preset here).",
                    "search": f"It reads the damage table of the predictor (see Predicted perplexity, above; built "
                              f"first when missing), then runs {values.get('generations', SEARCH_GENERATIONS.default)} "
                              f"generations, each measuring {SEARCH_MEASURED} children on calibration text; a "
                              "stopped search resumes from its last generation."}.get(
                name, "It reads the damage table of the predictor (see Predicted perplexity, above; built first when "
                      "missing), then solves for the allocation in a second.")
            jobs = _learn_jobs(name, S)
            mine = jobs.get(artifacts.learned_key(sel.stats_spec, name, S, a.pick(values)))
            if mine is not None:  # queued or under way: the job list below shows its progress
                st.info(f"{a.label} at S = {S:.0%} with these parameters is {mine.state} (job #{mine.id}, in the "
                        "list below); its curve appears here when the job is done.")
            else:
                st.info(f"{a.label} has not been learned for S = {S:.0%} with these parameters on this model and "
                        f"calibration set yet. {cost}")
                if st.button(f"Learn {a.label} at S = {S:.0%} in the background", key=f"alloc_learn_{name}"):
                    queue(sel, LearnRequest(sel.stats_spec, name, S, a.pick(values)))
                    _queued(f"Queued {a.label} at S = {S:.0%}: its curve and heatmap appear here when the job is done.")
            _other_parameters(name, S, a.pick(values), jobs)
            continue
        if heatmaps:
            learned_alloc = next(x for x in allocations if x.allocator == name)
            pair = [learned_alloc]
            if any(x.allocator == "owl" for x in allocations):
                pair.insert(0, next(x for x in allocations if x.allocator == "owl"))
            heat = np.concatenate([x.layer_sparsity for x in pair]) * 100
            cols = st.columns(len(pair))
            for col, x in zip(cols, pair):  # OWL may sit beside several learned allocations: keys name both
                col.plotly_chart(layer_sparsity_heatmap_figure(x, stats.layer_names, stats.layer_block,
                                                               (float(heat.min()), float(heat.max()))),
                                 width="stretch", key=f"alloc_heat_{name}_{x.allocator}")
        if "error_hard" in result:
            gain = 1 - np.mean(result["error_hard"]) / np.mean(result["error_uniform"])
            st.caption(f"Learned in {result['seconds']:.0f} s ({result['settings']['epochs']} epochs, "
                       f"{result['steps_per_block']} optimiser steps per block). Block reconstruction error with hard "
                       f"Wanda masks, averaged over blocks: {np.mean(result['error_hard']):.4f} with the learned "
                       f"sparsities vs {np.mean(result['error_uniform']):.4f} with S in every layer ({gain:.0%} lower).")


def _learn_jobs(name: str, S: float) -> dict:
    """The queued or running jobs learning allocator ``name`` at S on this model and calibration set, by the learned
    key of their parameters."""
    found = {}
    for job in job_store(sel).list(JOBS_SHOWN):
        r = job.request if job.kind == "learn" and job.state in ACTIVE_STATES else None
        if r is not None and r.allocator == name and r.sparsity == S and r.spec.key() == sel.stats_spec.key():
            found.setdefault(artifacts.learned_key(r.spec, name, S, r.params), job)
    return found


def _other_parameters(name: str, S: float, params: dict, jobs: dict) -> None:
    """The parameter sets a learned allocator has at this S on this model and calibration set besides ``params``:
    learned, being learned or queued (the job list's), or a search stopped at a saved generation; each with a button
    that sets the controls to it (a sweep's search, G = 30 and sequential = 1, was otherwise hidden behind the
    page's defaults)."""
    a = ALLOCATORS[name]
    # learned key → (parameters, what is there): learned first, then a job, then a stopped search
    learned = artifacts.learned_variants(sel.stats_spec, name, S, sel.cache_dir)
    status = {key: (p, "learned") for key, p in learned.items()}
    for key, job in jobs.items():
        status.setdefault(key, (job.request.params, f"{job.state}: job #{job.id}"
                                + (f", {job.phase} {job.done}/{job.total}" if job.total else "")))
    if name == "search":
        for saved in saved_searches(sel.stats_spec, S, sel.cache_dir):
            status.setdefault(saved["key"], (ALLOCATORS["search"].check(saved["params"]), f"stopped at generation "
                              f"{saved['state']['generation']} of {saved['generations']} (resumes when learned again)"))
    status.pop(artifacts.learned_key(sel.stats_spec, name, S, params), None)  # the controls' own set: shown above
    if not status:
        return
    st.caption(f"{a.label} at S = {S:.0%} on this model and calibration set, with other parameters:")
    for i, (p, text) in enumerate(status.values()):
        c = st.columns([5, 1.5])
        c[0].markdown(f"{params_text(p, a.params)} — {text}")
        c[1].button("Show it", key=f"alloc_other_{name}_{i}", on_click=_set_controls, args=(p,),
                    help="Set the parameter controls above to these values")


def _set_controls(params: dict) -> None:
    """A button's callback (run before the page, so the controls may still be set): the Allocation page's parameter
    controls to ``params``."""
    for k, v in params.items():
        st.session_state[f"alloc_{k}"] = v


def _search_report(result: dict | None, values: dict, S: float) -> None:
    """The search's fitness per generation, finished (its learned result) or running (its last saved generation)."""
    a = ALLOCATORS["search"]
    if result is None:
        saved = saved_search(sel.stats_spec, S, a.pick(values), sel.cache_dir)
        if saved is None:
            return
        state, total, params = saved["state"], saved["generations"], saved["params"]
        st.caption(f"Generation {state['generation']} of {total} saved (the curve above is its best allocation so "
                   "far). A running search adds one every few seconds (with sequential fitness, each refitted child "
                   "adds a calibration pass: about a prune's time with the search's method); a stopped one resumes "
                   "from here when learned again.")
    else:
        state, total, params = result, len(result["history"]), result["params"]
    if not state["history"]:
        return
    st.plotly_chart(search_progress_figure(state["history"], state["seeds"]), width="stretch",
                    key="alloc_search_progress")
    st.caption(search_caption(state, params))


what_if()
# one job list for everything the page queues (predictor tables, verifications, learned allocations)
jobs_panel(sel, "alloc_jobs_done")
