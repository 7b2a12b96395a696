"""Compare: every stored run side by side: table, perplexity vs sparsity, and two runs' allocations."""

import pandas as pd
import streamlit as st

from pruner import api
from pruner.charts import ppl_vs_sparsity_figure, two_runs_figure
from pruner.dashboard import page_setup
from pruner.store import list_runs

st.title("📈 Compare")
sel = page_setup()
if sel is None:
    st.stop()
runs = list_runs(sel.cache_dir)
if not runs:
    st.info("No runs yet: queue some on the Prune page.")
    st.page_link("pages/prune.py", label="Go to the Prune page", icon="✂️")
    st.stop()


def latest_ppl(run):
    found = [v for k, v in run.get("metrics", {}).items() if k.startswith("perplexity")]
    return found[-1] if found else None


rows = []
for r in runs:
    spec, p = r["spec"], latest_ppl(r)
    rows.append({"run": r["key"], "model": spec["model"].get("name") or spec["model"].get("hub_id") or spec["model"].get("path"),
                 "method": spec["method"], "allocator": spec["allocator"], "sparsity": spec["sparsity"],
                 "N:M": spec["nm"] or "", "λ": spec["lam"] if spec["lam"] is not None else float("nan"),
                 "M": spec["m"] if spec["m"] is not None else float("nan"), "achieved": r["achieved"]["overall"],
                 "ppl": p["perplexity"] if p else None,
                 "ppl chunks": f"{p['chunks']}/{p['chunks_total']}" if p else "",
                 "prune s": r["timings_s"]["prune"], "created": r["created"]})
table = pd.DataFrame(rows)
st.dataframe(table.style.format({"sparsity": "{:.0%}", "achieved": "{:.4%}", "ppl": "{:,.3f}", "prune s": "{:.1f}",
                                 "λ": "{:.2f}", "M": "{:g}"}, na_rep="–"), width="stretch", hide_index=True)
partial = table["ppl chunks"].str.split("/").apply(lambda x: len(x) == 2 and x[0] != x[1]).any()
if partial:
    st.caption("Perplexities marked k/n were computed on the first k of n chunks: a partial estimate.")

with_ppl = [row for row in rows if row["ppl"] is not None]
dense = None
try:
    dense_metrics = api.dense_perplexity_cached(sel.model, sel.cache_dir)
    dense = dense_metrics["perplexity"] if dense_metrics else None
except ValueError:
    pass
COLLAPSED = 1000.0  # perplexity above which a pruned model is no longer a language model worth plotting
if with_ppl:
    c = st.columns(2)
    methods = c[0].multiselect("Methods in the chart", sorted({r["method"] for r in with_ppl}),
                               default=sorted({r["method"] for r in with_ppl}), key="cmp_methods")
    collapsed = [r for r in with_ppl if r["ppl"] > COLLAPSED]
    show_all = c[1].checkbox(f"Include collapsed runs (perplexity > {COLLAPSED:g}): {len(collapsed)}", False,
                             key="cmp_collapsed")
    shown = [r for r in with_ppl if r["method"] in methods and (show_all or r["ppl"] <= COLLAPSED)]
    if shown:
        st.plotly_chart(ppl_vs_sparsity_figure([{**r, "sparsity": r["achieved"]} for r in shown], dense),
                        width="stretch")
    else:
        st.caption("No run matches the chart's filters.")

st.subheader("Two runs side by side")
labels = {r["key"]: r["label"] for r in runs}
c = st.columns(2)
a = c[0].selectbox("Run A", list(labels), format_func=labels.get, key="cmp_a")
b = c[1].selectbox("Run B", list(labels), index=min(1, len(labels) - 1), format_func=labels.get, key="cmp_b")
by_key = {r["key"]: r for r in runs}
st.plotly_chart(two_runs_figure(by_key[a], by_key[b]), width="stretch")

st.subheader("Zero-shot accuracy and CPU speed-up")
st.info("Zero-shot accuracy (lm-eval) and DeepSparse speed-up charts appear here once those evaluations exist "
        "for the runs (the evaluation module is not in this version yet).")
