"""Learn: outliers, the LOD, OWL's formula with the current numbers, and why uniform and global fall short."""

import dataclasses

import numpy as np
import streamlit as st

from pages._dashboard import page_setup, page_with_stats, param_controls
from pruner.allocation import LAMBDA, OWL_M, allocate, owl_lambda_max
from pruner.charts import allocation_figure, distribution_figure, lod_figure, ppl_vs_sparsity_figure
from pruner.runs.manifest import list_runs



def _measured_rows(sel) -> list[dict]:
    """One row per stored run of the selected model with a perplexity (its latest), for the perplexity chart."""
    rows = []
    for run in list_runs(sel.cache_dir).runs:
        p = run.latest_perplexity()
        if p is None or run.model_spec().key() != sel.model.key():
            continue
        rows.append({"method": run.method_label, "allocator": run.allocator, "parameters": run.parameters_text(),
                     "target": run.sparsity, "sparsity": run.achieved_overall, "ppl": p["perplexity"]})
    return rows


st.title("🎓 Learn: outlier-weighed layerwise sparsity")
sel, stats = page_with_stats(page_setup())

c = st.columns(3)
S = c[0].slider("Target sparsity S", 0.1, 0.9, 0.7, 0.05, key="learn_S")
# λ's slider ends where OWL is still valid at this S and M (at S = 90% on SmolLM2 well below the 0.3 shown for S = 70%)
owl_controls = (dataclasses.replace(LAMBDA, slider=(0.0, 0.3)), dataclasses.replace(OWL_M, slider=(1.0, 15.0)))
controls = param_controls(owl_controls, "learn", c[1:], sliders=True,
                          valid=lambda name, v, now: owl_lambda_max(stats.lod(v if name == "m" else now["m"]), S)
                          > (v if name == "lam" else now["lam"]))
lam, m = controls["lam"], controls["m"]
lod = stats.lod(m)

st.header("1 · What an outlier is")
st.markdown(
    "Pruning removes weights. Which ones matter? **Wanda** scores each weight by its size *and* the size of the "
    "input it multiplies, measured on a little calibration text:")
st.latex(r"A_{ij} = |W_{ij}| \cdot \lVert X_j \rVert_2")
st.markdown(
    "Most scores are small; a few are huge. A weight is an **outlier** if its score exceeds *M* times the mean "
    "score Ā of its transformer block. Removing outliers hurts an LLM badly, so they should be kept.")
edges, counts = stats.ratio_distribution()
above = (lod * stats.block_numel).sum() / stats.block_numel.sum()
st.plotly_chart(distribution_figure(edges, counts, m, above, "All scores of this model, relative to their block mean"),
                width="stretch")

st.header("2 · The layerwise outlier distribution (LOD)")
st.latex(r"D_\ell = \frac{1}{N_\ell}\,\#\{(i,j) \in \text{block } \ell : A_{ij} > M \cdot \bar A_\ell\}")
st.markdown(f"Blocks differ: here {lod.min():.2%} (block {lod.argmin()}) to {lod.max():.2%} (block {lod.argmax()}) "
            f"of scores are outliers at M = {m:g}.")
st.plotly_chart(lod_figure({m: lod}, title=f"Outlier ratio D per block at M = {m:g}"), width="stretch")

st.header("3 · OWL: give outlier-rich blocks more weights")
r_min, r_max = lod.min(), lod.max()
unit = (lod - r_min) / (r_max - r_min) if r_max > r_min else np.zeros_like(lod)
st.latex(r"\tilde D_\ell = \frac{D_\ell - \min D}{\max D - \min D}\cdot 2\lambda, \qquad "
         r"s_\ell = S - \left(\tilde D_\ell - \overline{\tilde D}\right)")
st.latex(rf"\tilde D_\ell = \frac{{D_\ell - {r_min:.4f}}}{{{r_max:.4f} - {r_min:.4f}}}\cdot {2 * lam:.2f}, \qquad "
         rf"\overline{{\tilde D}} = {2 * lam * unit.mean():.4f}, \qquad s_\ell = {S:.2f} - (\tilde D_\ell - "
         rf"{2 * lam * unit.mean():.4f})")
lam_max = owl_lambda_max(lod, S)
if lam >= lam_max:
    st.warning(f"With S = {S:.2f} this λ would push a block's sparsity outside [0, 1): λ must stay below {lam_max:.3f}.")
else:
    owl = allocate("owl", stats, S, lam=lam, m=m)
    st.markdown(
        f"The mean sparsity stays exactly S = {S:.0%} and the spread max − min is exactly 2λ = {2 * lam:.0%}. "
        f"Here blocks range from {owl.block_sparsity.min():.1%} (block {owl.block_sparsity.argmin()}, most outliers) "
        f"to {owl.block_sparsity.max():.1%} (block {owl.block_sparsity.argmax()}). Note the range is centred on "
        f"the *mean* of D̃, not on its midpoint, so it is S ± λ only when the outlier ratios are symmetric.")

    st.header("4 · Why uniform and global fall short")
    uniform = allocate("uniform", stats, S)
    try:
        glob = allocate("global", stats, S)
        spread = (f"here from {glob.block_sparsity.min():.0%} to {glob.block_sparsity.max():.0%}, which can gut "
                  "whole blocks")
    except ValueError as err:  # one threshold would empty a whole layer at this S
        glob, spread = None, f"here it cannot even reach S = {S:.0%}: {err}"
    st.markdown(
        "* **Uniform** gives every block S, ignoring that outlier-rich blocks lose important weights.\n"
        "* **Global** ranks all scores of the whole model against one threshold. Scores of different layers live "
        f"on different scales, so some blocks are pruned far more than others: {spread}.\n"
        f"* **OWL** moves each block away from S in proportion to its outlier ratio: the most outlier-rich block "
        f"is pruned least, the poorest most, and the two are 2λ = {2 * lam:.0%} apart (here block "
        f"{int(np.argmax(owl.block_sparsity))} at {owl.block_sparsity.max():.1%} and block "
        f"{int(np.argmin(owl.block_sparsity))} at {owl.block_sparsity.min():.1%}).")
    st.plotly_chart(allocation_figure([a for a in (uniform, owl, glob) if a is not None], S, lam), width="stretch")
st.header("5 · The consequence: perplexity")
st.markdown(
    "Whether OWL beats uniform, or λ = 0.12 beats λ = 0.08, is settled by pruning and measuring perplexity "
    "(lower is better). Two ways to see it here:\n"
    "* **Measured:** your pruned runs of this model (Prune page), their WikiText-2 perplexity against S.\n"
    "* **Predicted,** before pruning, by the **damage table** (built on the Allocation page, minutes once per S): "
    "each block pruned alone at a few sparsities on held-out text; an allocation's predicted loss is the sum of "
    r"its blocks' damages, $\text{NLL}_\text{ref} + \sum_b \Delta_b(s_b)$, plus a fitted correction for how "
    "damages compound. Each prediction takes microseconds.")
damage = None
if sel is not None:
    from pruner.predictor.cache import table_for
    from pruner.predictor.compounding import COMPOUNDING_PROBES

    damage = table_for(sel.stats_spec, S, sel.cache_dir)
measured = _measured_rows(sel) if sel is not None else []  # the measured side: what the user's runs scored
# the chart beside its notes, so that the section fits one 1280 × 800 screen for a class
chart, notes = st.columns([3, 2]) if measured else (None, st.container())
if measured:
    chart.plotly_chart(ppl_vs_sparsity_figure(measured, None).update_layout(height=340), width="stretch")
    notes.caption("Your runs of this model, one point per run (its latest stored perplexity); compare them with "
                  "their intervals on the Compare page.")
if damage is None:
    notes.info("No damage table for this model and calibration set yet: build it from the Allocation page "
               "(\"Predicted perplexity\") to see predictions here."
               + ("" if measured else " Prune a few runs (Prune page) to see measured ones."))
elif lam < lam_max:
    try:
        pu, po = (damage.predict(a.block_sparsity) for a in (uniform, owl))
    except ValueError as err:  # OWL's spread reaches beyond the table's grid
        pu = po = None
        st.caption(f"No live prediction for this λ: {err}")
    points = damage.points()
    higher = points[points > S + 1e-9]
    q = int(np.searchsorted(points, higher[0] if len(higher) else points[-1]))
    per_block = damage.delta().mean(axis=2)[:, q]
    if pu is not None:
        st.markdown(
            f"With the current numbers, from a table measured for {damage.reference_text()}: the reference scores "
            f"{damage.dense_perplexity:.1f} on the held-out windows; uniform at S = {S:.0%} is predicted "
            f"{pu.perplexity:.1f} and OWL (λ = {lam:.2f}, M = {m:g}) {po.perplexity:.1f}. Moved alone to "
            f"{points[q]:.0%}, block {int(per_block.argmax())} costs the most ({per_block.max():+.3f} nats) and "
            f"block {int(per_block.argmin())} the least ({per_block.min():+.3f}): an allocation that moves sparsity "
            "from the first kind to the second lowers the prediction.\n\n"
            "The sum assumes blocks damage the loss **independently**. They do not quite: a pruned block's output "
            "is the next block's input, so many damages together cost more than their sum, and many gains together "
            f"buy less. The table therefore also measures {COMPOUNDING_PROBES} random allocations *whole* on the "
            "same held-out windows "
            r"and fits two non-negative numbers to them: the prediction adds $\gamma_+$ times the products of the "
            r"damages of every pair of blocks, $2\sum_{b<c} \Delta^+_b \Delta^+_c$, and $\gamma_-$ times those of "
            "their gains (a block moved alone has no pair, so the table's own measurements stay exact)"
            + (f" (here γ₊ = {damage.gamma[0]:.3f}, γ₋ = {damage.gamma[1]:.3f})" if damage.compounding else
               " (this table predates the fit: its predictions are the plain sum)")
            + ". What allocation choices need is the **order** — does OWL beat uniform, which λ is best — and "
            "docs/results.md measures how well the predicted order matches real prunes (Spearman rank correlation "
            "over 25–26 allocations per S on SmolLM2): 0.93 at 50% (where the probes find no compounding) and, at "
            "70%, 0.85 for the plain sum against 0.91 with the fit (one calibration seed per measurement). It sees "
            "only how much score each block's masks remove, so allocators that differ only in how they spread "
            "sparsity inside a block look alike to it.")
st.caption("Yin et al., “Outlier Weighed Layerwise Sparsity (OWL)”, ICML 2024; Sun et al., “A Simple and Effective "
           "Pruning Approach for LLMs (Wanda)”, ICLR 2024.")
