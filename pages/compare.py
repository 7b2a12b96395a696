"""Compare: every stored run side by side: table, perplexity vs sparsity, and two runs' allocations."""

import pandas as pd
import streamlit as st

from pages._dashboard import (deepsparse_available, jobs_panel, openvino_amx_status, page_setup, queue, speed_settings,
                              speed_table_row, zeroshot_set_label)
from pruner.charts import (accuracy_vs_sparsity_figure, ppl_vs_sparsity_figure, ppl_vs_speedup_figure,
                           predicted_vs_measured_figure, speedup_vs_sparsity_figure, two_runs_figure,
                           zeroshot_tasks_figure)
from pruner.core.intervals import mean_accuracy_stderr
from pruner.evaluate.speed import STATUS_NOTE
from pruner.evaluate.speed_spec import SpeedSpec
from pruner.evaluate.zeroshot import TASKS
from pruner.jobs.workflows import DenseRequest, EvalRequest, PerplexityOptions, ZeroshotOptions
from pruner.predictor.cache import table_for
from pruner.predictor.tuning import spearman
from pruner.runs import metrics
from pruner.runs.groups import RunGroup, compare, group_runs, perplexity_metrics, perplexity_result, ranking, seed_of
from pruner.runs.manifest import list_runs

st.title("📈 Compare")
sel = page_setup()
if sel is None:
    st.stop()
listing = list_runs(sel.cache_dir)
for bad_key, why in listing.broken:  # named, not hidden: the rest of the page still works
    st.warning(f"Skipped run {bad_key}: {why}")
all_runs = listing.runs
model_identity = sel.model.identity()
runs = [r for r in all_runs if r.model_identity == model_identity]  # one model per comparison
if len(runs) < len(all_runs):
    st.caption(f"Showing the {len(runs)} run(s) of the model chosen in the sidebar; "
               f"{len(all_runs) - len(runs)} run(s) of other models are hidden.")
if not runs:
    st.info("No runs of this model yet: queue some on the Prune page.")
    st.page_link("pages/prune.py", label="Go to the Prune page", icon="✂️")
    st.stop()


rows = []
for r in runs:
    p = r.latest_perplexity()
    ci = (p or {}).get("interval") or {}
    rows.append({"run": r.key, "model": r.model_name, "method": r.method_label, "allocator": r.allocator,
                 "parameters": r.parameters_text(), "seed": seed_of(r),
                 "sparsity": r.sparsity, "N:M": r.nm or "", "achieved": r.achieved_overall,
                 "ppl": p["perplexity"] if p else None,
                 # the evaluation interval: how precisely the chunks measure this one model
                 "ppl 95%": f"[{ci['low']:,.1f}, {ci['high']:,.1f}]" if ci.get("low") is not None else "",
                 "chunks": f"{p['chunks']}/{p['chunks_total']}" if p else "",
                 # a LoRA-recovered run was trained from its parent, not pruned: its time is the training's
                 "prune / LoRA s": r.work_seconds})
table = pd.DataFrame(rows)
# columns that say nothing here go, so that the perplexity and its interval fit at 1280 px: the one model (named in
# the sidebar), N:M and parameters when no run has any
table = table.drop(columns=(["model"] if table["model"].nunique() == 1 else [])
                   + [c for c in ("N:M", "parameters") if not table[c].astype(bool).any()])
# the interval in one column and no creation time: every column fits at 1280 px
st.dataframe(table.style.format({"sparsity": "{:.0%}", "achieved": "{:.4%}", "ppl": "{:,.3f}",
                                 "prune / LoRA s": "{:.1f}"}, na_rep="–"),
             width="stretch", hide_index=True)
st.caption("ppl 95%: the evaluation interval over the chunks of WikiText-2 each run was scored on (how precisely "
           "the text measures that model, not how the method varies; that is the seed interval below).")
partial = table["chunks"].str.split("/").apply(lambda x: len(x) == 2 and x[0] != x[1]).any()
if partial:
    st.caption("Perplexities marked k/n were computed on the first k of n chunks: a partial estimate.")

groups = group_runs(runs)
protocols = perplexity_metrics(runs)
dense = None
try:
    dense_ppl = metrics.dense_perplexity_cached(sel.model, sel.cache_dir)
    dense = dense_ppl["perplexity"] if dense_ppl else None
except ValueError:
    pass
COLLAPSED = 1000.0  # perplexity above which a pruned model is no longer a language model worth plotting
if protocols:
    st.subheader("Perplexity with intervals")
    protocol = st.selectbox("Evaluation protocol", protocols, key="cmp_protocol", format_func=metrics.protocol_label,
                            help="only perplexities measured the same way are compared: dataset, window, all or "
                                 "the first k chunks")
    summaries = [(g, g.summary(protocol)) for g in groups]
    summaries = [(g, s) for g, s in summaries if s is not None]
    group_rows = [{"group": g.label, "method": g.first.method_label, "allocator": g.first.allocator,
                   "parameters": g.first.parameters_text(), "target": g.first.sparsity,
                   "sparsity": sum(r.achieved_overall for r in g.runs) / len(g.runs), "seeds": len(s.by_seed),
                   "ppl": s.perplexity.estimate, "ppl_low": s.perplexity.low, "ppl_high": s.perplexity.high,
                   "interval": "seeds" if s.kind == "seeds" else "evaluation (one seed)"} for g, s in summaries]
    # the label already names the parameters and S; the two keys are for the chart's lines and axis
    st.dataframe(pd.DataFrame(group_rows).drop(columns=["parameters", "target"]).style.format(
                     {"sparsity": "{:.2%}", "ppl": "{:,.3f}", "ppl_low": "{:,.3f}", "ppl_high": "{:,.3f}"}, na_rep="–"),
                 width="stretch", hide_index=True)
    st.caption("One row per run group (the runs of one spec that differ only in the calibration seed). With two or "
               "more seeds: geometric mean and a 95% t-interval over seeds of log-perplexity (is the method "
               "stable?); with one seed: that run's evaluation interval.")
    c = st.columns(2)
    methods = c[0].multiselect("Methods in the chart", sorted({r["method"] for r in group_rows}),
                               default=sorted({r["method"] for r in group_rows}), key="cmp_methods")
    collapsed = [r for r in group_rows if r["ppl"] > COLLAPSED]
    # every run is drawn unless the user hides the collapsed ones: on a small model at high sparsity most runs are
    # above the mark, and hiding them by default hid the very comparison asked for (the axis is logarithmic)
    hide = c[1].checkbox(f"Hide collapsed runs (perplexity > {COLLAPSED:g}): {len(collapsed)}", False,
                         key="cmp_hide_collapsed")
    shown = [r for r in group_rows if r["method"] in methods and not (hide and r["ppl"] > COLLAPSED)]
    # the dense model under this protocol: the line every pruned run is read against
    dense_here = perplexity_result(metrics.dense_metrics(sel.model, sel.cache_dir), protocol)
    dense = dense_here["perplexity"] if dense_here else None
    if shown:
        st.plotly_chart(ppl_vs_sparsity_figure(shown, dense), width="stretch")
    else:
        st.caption("No run matches the chart's filters.")
    if dense_here is None:
        window, chunks = metrics.protocol_options(protocol)
        c = st.columns([3, 2])
        c[0].caption(f"No dense baseline for this protocol yet: the unpruned {sel.model.name} on the same "
                     f"{'first ' + str(chunks) + ' chunks' if chunks else 'whole test set'} ({window}-token windows).")
        if c[1].button("Compute the dense baseline", key="cmp_dense",
                       help="WikiText-2 perplexity of the unpruned model under this protocol, as a background job; "
                            "drawn as a dotted line on the chart"):
            request = DenseRequest(sel.model, PerplexityOptions(chunks, window), data_dir=sel.data_dir)
            job = queue(sel, request)
            st.success(f"Queued job #{job}: {request.label()}.")
    else:
        st.caption(f"Dotted line: the dense {sel.model.name}, perplexity {dense:,.3f} under this protocol.")

    st.subheader("Ranking at one method and sparsity")
    settings = sorted({(g.first.method_label, g.first.sparsity, g.first.nm or "") for g, _ in summaries})
    setting = st.selectbox("Method and target sparsity", settings, key="cmp_rank_setting",
                           format_func=lambda t: f"{t[0]} @ {t[1]:.0%}" + (f", {t[2]}" if t[2] else ""))
    ranks = ranking([g for g, _ in summaries if (g.first.method_label, g.first.sparsity, g.first.nm or "") == setting],
                    protocol)
    # a static table, whose cells wrap: in a data grid the long interval texts were cut off at 1280 px
    st.table(pd.DataFrame([{
        "rank": i + 1, "run group": r.group.label, "seeds": len(r.summary.by_seed), "perplexity": r.summary.text(),
        "vs the row above": r.versus_next.text() if r.versus_next else
        ("–" if i == 0 else "cannot be paired (different seeds, or no per-chunk losses)"),
    } for i, r in enumerate(ranks)]).set_index("rank"))
    st.caption("“vs the row above”: perplexity of this row ÷ the row above, with its 95% interval. "
               "Each row is compared with the row above it, paired by calibration seed when both groups share two "
               "or more seeds, else by chunk when both are single runs on the same chunks. “Not separable”: the "
               "95% interval of the perplexity ratio contains 1, so the order of the two rows is not established.")

    # the predictor's ranking against pruning's (pruner.predictor.table): one point per Wanda run under this protocol
    st.subheader("Predicted vs measured perplexity")
    tables = {S: table_for(sel.stats_spec, S, sel.cache_dir) for S in sorted({r.sparsity for r in runs})}
    if not any(tables.values()):
        st.caption("No damage table for this model and calibration set: build it on the Allocation page to see "
                   "how well its predictions rank the runs.")
    else:
        points = []
        for r in runs:
            result = r.metrics.get(protocol)
            damage = tables[r.sparsity]
            if (damage is None or r.method != damage.meta.get("method", "wanda") or r.nm or r.is_recovery
                    or not result):
                continue
            try:
                p = damage.predict_allocation(r.allocation["block_sparsity"], r.allocation.get("layer_sparsity"))
            except (ValueError, KeyError):
                continue  # beyond the table's grid, or a run without a stored allocation
            ci = result.get("interval") or {}
            points.append({"sparsity": r.sparsity, "predicted": p.perplexity, "measured": result["perplexity"],
                           "low": ci.get("low"), "high": ci.get("high"),
                           "label": f"{r.label} (seed {seed_of(r)})"})
        if points:
            st.plotly_chart(predicted_vs_measured_figure(points), width="stretch", key="cmp_predicted")
            rho = {S: spearman([q["predicted"] for q in points if q["sparsity"] == S],
                               [q["measured"] for q in points if q["sparsity"] == S])
                   for S in sorted({q["sparsity"] for q in points})}
            around = ", ".join(f"{S:.0%}" for S, t in tables.items() if t is not None and abs(t.anchor - S) < 1e-6)
            st.caption(f"Wanda runs measured under {protocol}, predicted from their stored allocations by the tables "
                       f"of calibration seed {sel.stats_spec.calib.seed} (measured around S for "
                       f"{around or 'no S'}; the dense-reference table elsewhere). Spearman rank correlation per target "
                       "sparsity: " + "; ".join(f"{S:.0%}: " + (f"{v:.3f} ({n} runs)" if n > 2 else f"{n} run(s), too few")
                                                 for S, (v, n) in rho.items()) + ".")
        else:
            st.caption("No Wanda run evaluated under this protocol has an allocation the table can read.")

st.subheader("Two runs side by side")
labels = {r.key: r.label + (f" (seed {seed_of(r)})" if len(groups) < len(runs) else "") for r in runs}
c = st.columns(2)
a = c[0].selectbox("Run A", list(labels), format_func=labels.get, key="cmp_a")
b = c[1].selectbox("Run B", list(labels), index=min(1, len(labels) - 1), format_func=labels.get, key="cmp_b")
by_key = {r.key: r for r in runs}
shared = [m for m in protocols if m in by_key[a].metrics and m in by_key[b].metrics]
if a != b and shared:
    # these two models on the same chunks (are they different on this text?) ...
    models = compare(RunGroup(a, (by_key[a],)), RunGroup(b, (by_key[b],)), shared[0])
    lines = [f"Perplexity of run B relative to run A ({shared[0]}): " + (
        models.text() if models else "cannot be paired (no per-chunk losses stored)")]
    # ... and, for runs of two different groups, their groups over the seeds they share (is the order stable?)
    group_of = {r.key: g for g in groups for r in g.runs}
    if group_of[a] is not group_of[b]:
        seeds = compare(group_of[a], group_of[b], shared[0])
        if seeds is not None and seeds.paired_by == "seeds":
            lines.append(f"Their run groups: {seeds.text()}")
    st.caption("  \n".join(lines))
st.plotly_chart(two_runs_figure(by_key[a], by_key[b]), width="stretch")

# ---------------------------------------------------------------------------------------------------------------
st.subheader("Zero-shot accuracy (lm-eval)")
dense_all = metrics.dense_metrics(sel.model, sel.cache_dir)


def metric_set(prefix: str, label: str, describe, key: str, missing: str):
    """Let the user pick one stored result set (metric name) with this prefix; (name, runs that have it)."""
    names = sorted({k for r in runs for k in r.metric_names(prefix)})
    if not names:
        st.caption(f"No {missing} yet: queue them under “Evaluate runs” below.")
        return None, []
    name = st.selectbox(label, names, format_func=describe, key=key)
    return name, [r for r in runs if name in r.metrics]


zs_name, with_zs = metric_set("zeroshot:", "Result set", zeroshot_set_label, "cmp_zs_set", "zero-shot results")
if zs_name:
    dense_zs = dense_all.get(zs_name)
    task_sets = [set(r.metrics[zs_name]["tasks"]) for r in with_zs] + ([set(dense_zs["tasks"])] if dense_zs else [])
    common = [t for t in TASKS if all(t in ts for ts in task_sets)]
    limit = with_zs[0].metrics[zs_name]["limit"]
    note = f" (partial: first {limit} documents per task)" if limit else ""
    if not common:
        st.warning("These runs were evaluated on different tasks; there is no task they all share.")
    else:
        if len(common) < len(TASKS):
            st.caption(f"Shown: the {len(common)} task(s) every run here was evaluated on.")
        labels_zs = {r.key: r.label for r in with_zs}
        picked = st.multiselect("Runs in the per-task chart", list(labels_zs), default=list(labels_zs)[:4],
                                format_func=labels_zs.get, key="cmp_zs_runs")
        entries = ([{"label": "dense", "tasks": dense_zs["tasks"]}] if dense_zs else []) + [
            {"label": labels_zs[k], "tasks": next(r for r in with_zs if r.key == k).metrics[zs_name]["tasks"]}
            for k in picked]
        if entries:
            st.plotly_chart(zeroshot_tasks_figure(entries, {t: TASKS[t].label for t in common}, note),
                            width="stretch")

        def mean_over(tasks):
            return sum(tasks[t]["acc"] for t in common) / len(common)

        acc_rows = [{"method": r.method_label, "allocator": r.allocator, "parameters": r.parameters_text(),
                     "target": r.sparsity, "sparsity": r.achieved_overall,
                     "mean_acc": mean_over(r.metrics[zs_name]["tasks"]),
                     "mean_acc_stderr": mean_accuracy_stderr({t: r.metrics[zs_name]["tasks"][t] for t in common})}
                    for r in with_zs]
        st.plotly_chart(accuracy_vs_sparsity_figure(acc_rows, mean_over(dense_zs["tasks"]) if dense_zs else None,
                                                    len(common), note), width="stretch")

# ---------------------------------------------------------------------------------------------------------------
st.subheader("CPU speed-up (DeepSparse and OpenVINO)")
st.caption("⚠️ " + STATUS_NOTE + " OpenVINO (maintained) compares 8-bit sparse with 8-bit dense: its sparse weight "
           "decompression needs a CPU with AMX.")
ds = deepsparse_available()
if not ds["available"]:
    st.warning(f"DeepSparse cannot run here: {ds['reason']}. Speed evaluations then record dense ONNX Runtime "
               "timings and an *estimate* of the ideal decode speed-up, never a measured sparse speed-up.")
ov_status = openvino_amx_status()
if not ov_status["available"]:
    st.info(ov_status["reason"] + " (the 8-bit perplexity still runs).")
sp_setting, sp_names = speed_settings(runs)
if sp_setting is None:
    st.caption("No speed measurements yet: queue them under “Evaluate runs” below.")
else:
    with_sp = [(r, name) for name in sp_names for r in runs if name in r.metrics]
    measured = [(r, name) for r, name in with_sp if r.metrics[name]["speedup"].get("decode")]
    sp_rows = [{"method": r.method_label, "allocator": r.allocator, "parameters": r.parameters_text(),
                "target": r.sparsity, "sparsity": r.achieved_overall, **r.metrics[name]["speedup"],
                "engine": r.metrics[name]["engine"], "ideal": r.metrics[name].get("ideal_decode_speedup_estimate"),
                "ppl": (r.latest_perplexity() or {}).get("perplexity")} for r, name in measured]
    first = with_sp[0][0].metrics[with_sp[0][1]]
    env, timing = first["env"], first["spec"]
    turns = (f", dense and pruned in turn over {timing['rounds']} rounds (the table gives each round's decode "
             f"speed-up)" if timing.get("rounds") else "")
    st.caption(f"CPU: {env['cpu']} ({', '.join(env['flags'])}), {env['threads']} threads; "
               f"median of {timing['runs']} timed calls after warm-up{turns}.")
    if sp_rows:
        st.plotly_chart(speedup_vs_sparsity_figure(sp_rows), width="stretch")
        with_ppl_sp = [r for r in sp_rows if r["ppl"] is not None and r["engine"] == "deepsparse"]
        if with_ppl_sp:
            st.plotly_chart(ppl_vs_speedup_figure(with_ppl_sp, dense), width="stretch")
    st.dataframe(pd.DataFrame([speed_table_row(r, name) for r, name in with_sp]), width="stretch", hide_index=True)

# ---------------------------------------------------------------------------------------------------------------
with st.expander("Evaluate runs: full perplexity, zero-shot accuracy and CPU speed-up (background jobs)"):
    with st.form("cmp_eval_form"):
        with_weights = [r.key for r in runs if not r.weights_dropped]  # the same runs, in the order of labels
        chosen = st.multiselect("Runs", with_weights, format_func=labels.get, key="cmp_eval_runs",
                                help=None if len(with_weights) == len(labels) else
                                f"{len(labels) - len(with_weights)} run(s) kept only their metrics (weights dropped "
                                "after evaluation) and are not offered; `python -m pruner prune ... --force` with their settings "
                                "restores them")
        # the task chips get a row of their own (in half of it they were cut off after the fourth of seven), and
        # the full-test label is short with its detail in the tooltip (at 1280 px it ran off the side)
        do_zs = st.checkbox("Zero-shot accuracy (lm-eval)", value=True, key="cmp_eval_zs")
        tasks = st.multiselect("Tasks", list(TASKS), default=list(TASKS), format_func=lambda t: TASKS[t].label,
                               key="cmp_eval_tasks")
        c = st.columns(2)
        limit = c[0].number_input("Documents per task (0 = full sets, slow on CPU)", min_value=0, value=100,
                                  step=50, key="cmp_eval_limit")
        do_ppl = c[1].checkbox("Full WikiText-2 perplexity", value=False, key="cmp_eval_ppl",
                               help="every chunk of the test set: the headline protocol; about 8 min per SmolLM2 "
                                    "run here")
        do_speed = c[1].checkbox("CPU speed-up (ONNX export)", value=False, key="cmp_eval_speed")
        engine = c[1].selectbox("Speed engine", ["auto", "openvino"], key="cmp_eval_engine",
                                format_func={"auto": "DeepSparse (end of life; dense ONNX Runtime where it cannot run)",
                                             "openvino": "OpenVINO 8-bit (needs AMX for a speed-up)"}.get,
                                help="OpenVINO quantizes dense and pruned to 8 bits (w8a8) and packs the pruned "
                                     "weights on CPUs with AMX; with full perplexity chosen it also measures the "
                                     "8-bit models' perplexity")
        seqlen = c[1].number_input("T: prefill tokens and decode KV-cache length", min_value=16, max_value=2048,
                                   value=SpeedSpec.seqlen, step=16, key="cmp_eval_seqlen")
        go = st.form_submit_button("Queue evaluations")
    if go:
        if not chosen:
            st.error("Choose at least one run.")
        elif not (do_zs or do_speed or do_ppl):
            st.error("Choose full perplexity, zero-shot accuracy and/or CPU speed-up.")
        elif do_zs and not tasks:
            st.error("Choose at least one zero-shot task.")
        else:
            for key in chosen:
                queue(sel, EvalRequest(key, perplexity=PerplexityOptions() if do_ppl else None,
                                       zeroshot=ZeroshotOptions(tuple(tasks), int(limit) or None) if do_zs else None,
                                       speed=SpeedSpec(seqlen=int(seqlen)) if do_speed else None,
                                       engine=engine, data_dir=sel.data_dir))
            st.success(f"Queued {len(chosen)} evaluation job(s); results appear here when they finish.")
    jobs_panel(sel, "cmp_jobs_done")
