"""The Allocation page's words under a search's fitness chart (``pruner.predictor.search``): what was measured, how
well the damage table ranked it, where the search started and how its parents were scored. Plain text from the saved
state, so it is tested without a page."""

from pruner.allocation import ALLOCATORS
from pruner.predictor.search import generation_rank_correlations


def search_caption(state: dict, params: dict) -> str:
    """The caption of a search's ``state`` (a learned result or a saved generation: its ``history``, ``seeds`` and
    ``pairs``) learned with ``params`` (checked: ``screen``, and ``sequential`` and ``sparsegpt`` where present).

    With sequential fitness, a child that beat its parent under the parent's prune is refitted (a calibration pass)
    and becomes the parent only if it still beats it under its own: refits and new parents are counted apart."""
    history = state["history"]
    measured = sum(h["measured"] for h in history)
    proposed = sum(h["proposed"] for h in history)
    within = [r for r in generation_rank_correlations(history, state.get("pairs", [])) if r is not None]
    rho = f"{sum(within) / len(within):+.2f} within a generation" if within else "n/a"
    refits = sum(bool(h.get("refitted")) for h in history)
    parents = sum(bool(h.get("refitted")) and bool(h["replaced"]) for h in history)
    refitted = (f"{refits} {'child' if refits == 1 else 'children'} that beat the parent refitted, each a calibration "
                f"pass; {parents} of them still beat it under their own prune and became the parent")
    if params.get("sparsegpt"):
        how = (f"Children pruned by SparseGPT from the Hessians of the parent's sequential SparseGPT prune: {refitted} "
               "(a parent's fitness is its final SparseGPT prune's).")
    elif params.get("sequential"):
        how = (f"Masks from the parent's sequential Wanda prune: {refitted} (a parent's fitness is its final Wanda "
               "prune's).")
    else:
        how = "Masks from the dense model's input norms (one-shot)."
    chosen = state["seeds"]["chosen"]
    return (f"{measured} of {proposed} children measured on calibration text "
            + ("(the damage table chose them" if params["screen"] else "(chosen at random: screening off")
            + f"), {history[-1]['forward_tokens']:,} tokens scored in all. How well the table ranks the measured "
            f"children (Spearman's ρ, 1 is perfect): {rho}. Started from "
            f"{ALLOCATORS[chosen].label if chosen in ALLOCATORS else chosen}, the best of the seeds (dotted). " + how)
