"""Allocators compared with intervals: prune every (method, allocator, sparsity) for several calibration seeds,
evaluate WikiText-2 perplexity (the full test set unless --max-chunks), and print per (method, sparsity) a ranking
of run groups with their seed intervals and whether neighbours separate (paired by seed).

    python -m bench.seed_study --allocators uniform owl --methods wanda --sparsities 0.7 --seeds 3
    python -m bench.seed_study ... --report      # only print, from the runs already in the cache
    python -m bench.seed_study ... --report --versus uniform --matrix   # one table: allocators × (method, S)
    python -m bench.seed_study --allocators uniform owl owl:lam=0.12,m=10 owl:tuned atp:tuned predicted ...

An allocator may carry parameters (``NAME:K=V,K=V``) or ``NAME:tuned``: its parameters chosen once per (method, S)
on the perplexity predictor's table around S (calibration seed 0's statistics; held-out validation windows, never
the test split), then used for every seed, so the seeds stay one run group.

Before anything is pruned, every closed-form allocation the study asks for is computed from the (cached)
statistics: a refused one (e.g. DLP's α too wide for S = 0.8) stops the study with every refusal and its allowed
range, having pruned nothing; so does a stored run whose weights were dropped (``--drop-weights``) and whose stored
perplexities cannot give the protocol asked for (e.g. the full test set after a first-8 study). ``--skip-refused``
leaves those out instead and names them in the report. (Learned allocators, BESA and the predictor-optimal one, are
learned when their turn comes.)

``--matrix`` (with ``--versus``) ends with one Markdown table, an allocator entry per row and a (method, S) per
column, each cell the entry's perplexity ÷ the --versus entry's, paired by seed, with its 95% interval (bold where
it excludes 1, "–" where either group is missing), the table at the top of docs/results.md. ``--versus best``
compares each entry, per (method, S), with the best group of *another* allocator: the lowest geometric-mean
perplexity over the entry's own seeds, among the entries whose allocator differs (so two settings of the searched
allocation are never each other's baseline); the cell names that group. Picking the baseline after seeing the test
perplexities favours the baseline, never the entry.

    python -m bench.seed_study --allocators uniform owl dlp atp predicted besa search:generations=30,sequential=1 \
        --methods wanda sparsegpt --sparsities 0.6 0.7 0.8 --seeds 3 --max-chunks 8 --report --versus best --matrix

Runs are ordinary cached runs (same spec → same key), so the CLI (`prune --seeds 3 --ppl`), the Prune page and
this script share them. ``--records FILE`` keeps the study's runs (numbers, no weights) in a ledger under docs/
that outlives the cache (``bench/records.py``): the Done-when table of the searched allocation is grown so, one
search at a time, on machines that keep no cache between them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from bench.common import git_rev, machine
from bench.records import read_records, write_records
from pruner.allocation import ALLOCATORS, AllocationRefused
from pruner.cli.common import phase_bars
from pruner.core.params import params_text
from pruner.engine.artifacts import allocation_for
from pruner.jobs.workflows import Context, PerplexityOptions, PruneRequest, run
from pruner.model.catalogue import ModelSpec
from pruner.runs.groups import compare, group_runs, perplexity_result, ranking
from pruner.runs.manifest import list_runs, read_run, run_dir, run_exists
from pruner.runs.metrics import perplexity_metric_name, perplexity_protocol, stored_perplexity
from pruner.specs import CalibSpec, PruneSpec
from pruner.store.files import default_data_dir


def _label(run) -> str:
    """An allocator's name with its parameters, e.g. "OWL (λ=0.15, M=10.5)"."""
    a = ALLOCATORS[run.allocator]
    return a.setting_label(params_text(run.allocator_params, a.params))


_tuned: dict[tuple, dict] = {}


def _params(entry: str, allocator: str, method: str, S: float, calib: CalibSpec, model: str,
            cache_dir: str | None) -> dict:
    """The parameters an ``--allocators`` entry asks for: none (defaults), ``K=V,…``, or ``tuned``."""
    _, _, given = entry.partition(":")
    if not given:
        return {}
    if given != "tuned":
        return _given_params(given)
    if (allocator, method, S) not in _tuned:  # the workflow `prune --tune` runs, on seed 0's calibration set
        from pruner.jobs.workflows import tuned_spec

        _, t = tuned_spec(PruneSpec(model=ModelSpec(model), calib=calib, allocator=allocator,
                                    method=method, sparsity=S), Context(cache_dir=cache_dir))
        print(f"# {allocator} with {method} at S = {S:.0%} tuned on the predictor around S ({t['table_method']} "
              f"table): {t['params']} (predicted {t['predicted_perplexity']:.1f}, {t['tried'] - t['skipped']} of "
              f"{t['tried']} grid points readable)" + (f"; caveat: {t['caveat']}" if t.get("caveat") else ""),
              flush=True)
        _tuned[(allocator, method, S)] = t["params"]
    return _tuned[(allocator, method, S)]


def _given_params(given: str) -> dict:
    """The ``K=V,K=V`` part of an ``--allocators`` entry as {K: float(V)}."""
    return {k: float(v) for k, v in (kv.split("=") for kv in given.split(","))}


def _entry_label(entry: str) -> str:
    """A row label for an ``--allocators`` entry: "OWL (λ=0.08, M=5)" (defaults shown), "DLP (α=0.13)", "ATP (tuned)"."""
    name, _, given = entry.partition(":")
    a = ALLOCATORS[name]
    if given == "tuned":
        return a.setting_label("tuned")
    values = a.check(_given_params(given) if given else {})
    return a.setting_label(params_text(values, a.params))


def _ratio_text(v: float) -> str:
    return f"{v:.3f}" if v < 10 else (f"{v:.1f}" if v < 100 else f"{v:.0f}")


def matrix_cell(d, seeds: int, note: str = "") -> str:
    """One matrix cell from a paired comparison: "×0.978 [0.960, 0.996]", bold when separable, the number of
    paired seeds named when it is not the study's; "–" without a comparison."""
    if d is None:
        return "–"
    r = d.ratio
    text = (f"×{_ratio_text(r.estimate)}" + (f" [{_ratio_text(r.low)}, {_ratio_text(r.high)}]" if r.low is not None
                                            else " (no interval)"))
    if r.n != seeds:
        text += f" ({r.n} {d.paired_by})"
    text += note
    return f"**{text}**" if d.separable else text


#: ``--versus`` value comparing each entry with the best group of another allocator.
BEST_OTHER = "best"


def best_other(group, others, metric: str):
    """Of ``others`` (groups of other allocators), the one with the lowest geometric-mean perplexity over
    ``group``'s seeds under ``metric``; groups missing one of those seeds are passed over. None if none qualifies."""
    import math

    mine = group.summary(metric)
    if mine is None:
        return None
    scored = []
    for g in others:
        theirs = g.summary(metric)
        if theirs is not None and set(mine.by_seed) <= set(theirs.by_seed):
            scored.append((sum(math.log(theirs.by_seed[s]) for s in mine.by_seed), len(scored), g))
    return min(scored)[2] if scored else None


def refusals(specs: list[PruneSpec], cache_dir: str | None) -> dict[str, str]:
    """{spec key: the allocator's refusal} for every spec whose closed-form allocation is refused (statistics
    are computed and cached where missing; runs already in the cache and learned allocators are not checked)."""
    refused = {}
    for spec in specs:
        if ALLOCATORS[spec.allocator].learned or run_exists(spec.key(), cache_dir):
            continue
        try:
            allocation_for(spec.stats_spec, spec.allocator, spec.sparsity, spec.allocator_params, cache_dir=cache_dir)
        except AllocationRefused as e:  # other errors (malformed input, missing data) are raised, not listed
            refused[spec.key()] = f"{spec.label()}, seed {spec.calib.seed}: {e}"
    return refused


def unanswerable(specs: list[PruneSpec], max_chunks: int | None, cache_dir: str | None) -> dict[str, str]:
    """{spec key: why} for every stored run whose weights were dropped and whose stored evaluations cannot give
    the perplexity asked for (more chunks than it was evaluated on, or the full test set after a partial one):
    without weights it cannot be evaluated again. Found before anything is pruned, not an hour into the study."""
    missing = {}
    for spec in specs:
        if not run_exists(spec.key(), cache_dir):
            continue
        folder = run_dir(spec.key(), cache_dir)
        run = read_run(folder)
        if run.weights_dropped and stored_perplexity(folder, max_chunks=max_chunks) is None:
            stored = ", ".join(sorted(n for n in run.metrics if n.startswith("perplexity:"))) or "none"
            asked = f"the first {max_chunks} chunks" if max_chunks else "the full test set"
            missing[spec.key()] = (f"{spec.label()}, seed {spec.calib.seed}: run {spec.key()} cannot be evaluated on "
                                   f"{asked}: its weights were dropped and its stored perplexities ({stored}) do not "
                                   "cover it; `python -m pruner prune ... --force` with the same settings prunes it "
                                   "again (dropping its stored metrics)")
    return missing


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model id, bundled name or local folder")
    p.add_argument("--cache-dir", help="the cache to read and write (default: <project>/cache)")
    p.add_argument("--allocators", nargs="+", default=["uniform", "owl"])
    p.add_argument("--methods", nargs="+", default=["wanda"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.7])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--max-chunks", type=int, help="first N chunks only (partial); default: the full test set")
    p.add_argument("--report", action="store_true", help="print from cached runs only; prune nothing")
    p.add_argument("--drop-weights", action="store_true",
                   help="keep only each new run's manifest and metrics (saves 0.5 GB of disk per SmolLM2 run)")
    p.add_argument("--versus", help="also compare every group with this allocator's group (an --allocators entry, "
                                    "e.g. uniform), paired by seed; `best`: with the best group of another allocator "
                                    "in the same (method, S), over the entry's seeds")
    p.add_argument("--matrix", action="store_true",
                   help="end with one table: every --allocators entry ÷ the --versus one, per (method, S)")
    p.add_argument("--records", metavar="FILE",
                   help="a JSON-lines ledger of the study's runs (manifest and metrics, no weights; bench/records.py): "
                        "runs recorded there with the perplexity asked for are reported from it, not pruned again, "
                        "and every run reported from the cache is written into it")
    p.add_argument("--skip-refused", action="store_true",
                   help="leave out allocations the allocator refuses, and stored runs whose weights were dropped "
                        "before they were evaluated as asked (and say so), instead of stopping before pruning")
    args = p.parse_args(argv)
    if args.matrix and not args.versus:
        p.error("--matrix compares every entry with the --versus entry: give --versus (e.g. --versus uniform)")
    if args.versus not in (None, BEST_OTHER) and args.versus not in args.allocators:
        p.error(f"--versus must be one of the --allocators entries ({', '.join(args.allocators)}) or {BEST_OTHER!r}; "
                f"got {args.versus!r}")
    data_dir = os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
    calib = CalibSpec.preset(args.preset, data_dir=data_dir)
    specs = [PruneSpec(model=ModelSpec(args.model), calib=dataclasses.replace(calib, seed=seed),
                       allocator=a, method=m, sparsity=S,
                       allocator_params=_params(entry, a, m, S, calib, args.model, args.cache_dir))
             for m in args.methods for S in args.sparsities for entry in args.allocators
             for a in [entry.partition(":")[0]] for seed in range(args.seeds)]
    # the protocol of the evaluation asked for (SmolLM2's window: min(2048, its context))
    asked = perplexity_protocol(2048, args.max_chunks)
    recorded = read_records(args.records) if args.records else {}
    answered = {s.key() for s in specs if s.key() in recorded and not run_exists(s.key(), args.cache_dir)
                and perplexity_result(recorded[s.key()].run.metrics, asked) is not None}
    to_check = [s for s in specs if s.key() not in answered]
    refused = {} if args.report else refusals(to_check, args.cache_dir)
    dropped = {} if args.report else unanswerable(to_check, args.max_chunks, args.cache_dir)
    if (refused or dropped) and not args.skip_refused:
        print("stopped before pruning anything (rerun with other parameters, or --skip-refused to leave these out):",
              *(f"refused by the allocator: {r}" for r in refused.values()), *dropped.values(),
              sep="\n- ", file=sys.stderr)
        raise SystemExit(2)
    specs = [s for s in specs if s.key() not in refused and s.key() not in dropped]
    keys = {s.key() for s in specs}
    stored = sum(run_exists(k, args.cache_dir) for k in keys)
    if not args.report:
        recorded_text = f"{len(keys & answered)} recorded in {args.records}, " if args.records else ""
        print(f"# {len(keys)} runs: {stored} stored, {recorded_text}{len(keys - answered) - stored} to prune "
              "(progress on stderr)", flush=True)
    protocol = None
    for spec in specs:
        if args.report or spec.key() in answered:
            continue
        result = run(PruneRequest(spec, PerplexityOptions(max_chunks=args.max_chunks), data_dir=data_dir,
                                  drop_weights=args.drop_weights and not run_exists(spec.key(), args.cache_dir)),
                     Context(cache_dir=args.cache_dir, progress=phase_bars()))
        protocol = perplexity_metric_name(result["details"]["perplexity"])
        print(f"{spec.label()}, seed {spec.calib.seed}: perplexity {result['perplexity']:.3f}", flush=True)
    cached = [r for r in list_runs(args.cache_dir).runs if r.key in keys]
    from_records = [recorded[k].run for k in sorted(keys & set(recorded) - {r.key for r in cached})]
    runs = cached + from_records
    if protocol is None:  # --report, or every run answered by the records
        protocol = asked
    print(f"# machine: {machine()}; commit {git_rev()}; protocol {protocol}; calibration preset {args.preset}")
    if args.records:
        commits = sorted({recorded[r.key].recorded["commit"] for r in from_records})
        written = write_records(args.records, cached, commit=git_rev(), machine=machine())
        print(f"# records {args.records}: {len(from_records)} run(s) reported from it"
              + (f" (recorded at commit{'s' if len(commits) > 1 else ''} {', '.join(commits)})" if commits else "")
              + f", {written} written to it now")
    for reason in refused.values():
        print(f"# left out, refused by the allocator: {reason}")
    for reason in dropped.values():
        print(f"# left out: {reason}")
    cells: dict[tuple, str] = {}  # (entry, method, S) -> its --matrix cell

    def group_of(entry: str, groups, m: str, S: float):
        """The entry's run group (parameters compared with defaults filled in: {} is OWL's λ=0.08, M=5), or None."""
        name = entry.partition(":")[0]
        a = ALLOCATORS[name]
        params = a.check(_params(entry, name, m, S, calib, args.model, args.cache_dir))
        return next((g for g in groups if g.first.allocator == name and a.check(g.first.allocator_params) == params),
                    None)

    for m in args.methods:
        for S in args.sparsities:
            groups = [g for g in group_runs(runs) if g.first.method == m and g.first.sparsity == S]
            print(f"\n{m} @ {S:.0%}")
            print("| rank | allocator | seeds | perplexity per seed | geometric mean [95% seed interval] | vs the row above |")
            print("|---|---|---|---|---|---|")
            for i, r in enumerate(ranking(groups, protocol)):
                per_seed = ", ".join(f"{p:.1f}" for p in r.summary.by_seed.values())
                vs = r.versus_next.text() if r.versus_next else "–"
                print(f"| {i + 1} | {_label(r.group.first)} | {len(r.summary.by_seed)} | {per_seed} | "
                      f"{r.summary.perplexity.text(1)} | {vs} |")
            if not args.versus:
                continue
            if args.versus == BEST_OTHER:
                print("\nEach group ÷ the best group of another allocator over its seeds (paired by seed; one seed: "
                      "by chunk):")
                for entry in args.allocators:
                    group = group_of(entry, groups, m, S)
                    others = [g for e in args.allocators if e.partition(":")[0] != entry.partition(":")[0]
                              for g in [group_of(e, groups, m, S)] if g is not None]
                    base = best_other(group, others, protocol) if group is not None else None
                    if base is None:
                        continue
                    d = compare(base, group, protocol)
                    print(f"- {_label(group.first)} ÷ {_label(base.first)}: {d.text() if d else 'cannot be paired'}")
                    cells[(entry, m, S)] = matrix_cell(d, args.seeds, f" vs {_label(base.first)}")
                continue
            base = group_of(args.versus, groups, m, S)
            if base is None:
                print(f"# no {args.versus} group at {S:.0%} to compare with")
                continue
            print(f"\nEach group ÷ {args.versus} (paired by seed):")
            for entry in args.allocators:
                group = group_of(entry, groups, m, S)
                if group is None or group is base:
                    continue
                d = compare(base, group, protocol)
                print(f"- {_label(group.first)}: {d.text() if d else 'cannot be paired'}")
                a = ALLOCATORS[group.first.allocator]
                tuned = f" ({params_text(group.first.allocator_params, a.params)})" if entry.endswith(":tuned") else ""
                cells[(entry, m, S)] = matrix_cell(d, args.seeds, tuned)
    if args.matrix:
        columns = [(m, S) for m in args.methods for S in args.sparsities]
        versus = ("the best group of another allocator in its column (over the entry's seeds; named in the cell)"
                  if args.versus == BEST_OTHER else _entry_label(args.versus))
        print(f"\nEach entry ÷ {versus}, paired by seed: geometric mean with its 95% t-interval; "
              f"bold: separable; –: not measured. Protocol {protocol}.\n")
        print("| allocator | " + " | ".join(f"{m} {S:.0%}" for m, S in columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for entry in args.allocators:
            if entry != args.versus:
                print(f"| {_entry_label(entry)} | " + " | ".join(cells.get((entry, m, S), "–") for m, S in columns)
                      + " |")


if __name__ == "__main__":
    main()
