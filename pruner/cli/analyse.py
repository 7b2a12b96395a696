"""Commands that look at the dense model and its allocations: `model`, `stats`, `allocate`, `predict`."""

from __future__ import annotations

import json

import numpy as np

from pruner.allocation.formulas import check_sparsity
from pruner.allocation.registry import ALLOCATORS
from pruner.cli.common import (BadInput, add_common, add_expert_flags, add_param_flags, add_stream_flag, cache_arg,
                               check_m, declared_params, expert_from_args, model_spec_from, params_from_args,
                               progress_bar, queued, stats_spec_from)
from pruner.core.params import params_text

#: LOD columns printed by `stats` when no --m is given (the thresholds the OWL paper sweeps around its M = 5).
DEFAULT_TABLE_M = (3.0, 5.0, 7.0)


def cmd_model(args) -> int:
    """What the model is made of: blocks, prunable layers (routed experts included) and every block weight that is not
    pruned, with the reason. Reads only the config and shapes (no weights are loaded)."""
    from pruner.model.anatomy import UNSUPPORTED, not_pruned_text
    from pruner.model.loading import load_model, model_summary

    spec = model_spec_from(args)
    s = model_summary(load_model(spec, cache_arg(args), stream=True))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{spec.name}: {s['architecture']}, {s['blocks']} blocks at {s['blocks_path']}, "
          f"{s['total_parameters'] / 1e6:.1f} M parameters, {s['decoder_block_parameters'] / 1e6:.1f} M in the "
          f"blocks, {s['prunable_parameters'] / 1e6:.1f} M prunable")
    if s.get("experts_per_block"):
        print(f"routed experts per block: {s['experts_per_block']} (each expert's matrices are layers of their own)")
    print("prunable layers (*: every routed expert): " + ", ".join(s["layer_kinds"]))
    for w in s["not_pruned"]:
        print(not_pruned_text(w))
    if any(w["role"] == UNSUPPORTED for w in s["not_pruned"]):
        print("a prune refuses this model unless --leave-unsupported-dense (the weights above stay dense, listed in "
              "the manifest)")
    return 0


def cmd_stats(args) -> int:
    from pruner.engine.artifacts import get_stats

    ms = [check_m(m) for m in (args.m or DEFAULT_TABLE_M)]
    spec = stats_spec_from(args)
    stats = get_stats(spec, cache_arg(args), progress=progress_bar("outlier statistics"), batch_size=args.batch_size,
                      stream=args.stream)
    table = np.stack([stats.lod(m) for m in ms], axis=1) * 100
    if args.json:
        print(json.dumps({"key": spec.key(), "m": ms, "lod_percent": table.tolist()}, indent=2))
        return 0
    print(f"Layerwise outlier distribution (% of Wanda scores above M × block mean), stats key {spec.key()}")
    print("block " + " ".join(f"{'M=' + format(m, 'g'):>8}" for m in ms))
    for i, row in enumerate(table):
        print(f"{i:5d} " + " ".join(f"{v:8.3f}" for v in row))
    return 0


def cmd_allocate(args) -> int:
    from pruner.engine.artifacts import allocation_for, cached_learned

    try:
        S = check_sparsity(args.sparsity)
    except ValueError as err:
        raise BadInput(str(err)) from err
    params, _ = params_from_args(args, args.allocator, None)
    params = ALLOCATORS[args.allocator].check(params)
    split, split_params = expert_from_args(args)
    spec = stats_spec_from(args)
    a = ALLOCATORS[args.allocator]
    stats, alloc = allocation_for(spec, args.allocator, S, params, cache_dir=cache_arg(args), expert_split=split,
                                  expert_params=split_params,
                                  progress=progress_bar("learning " + a.label if a.learned else "outlier statistics",
                                                         {"predicted": "step", "search": "generation"}.get(
                                                             args.allocator, "block")),
                                  batch_size=args.batch_size, stream=args.stream)
    learning = cached_learned(spec, args.allocator, S, params, cache_arg(args)) if a.learned else None
    if args.json:
        print(json.dumps({**alloc.to_dict(stats.layer_names, stats.layer_block),
                          **({"learning": learning} if learning else {})}, indent=2))
        return 0
    text = params_text(alloc.params, a.params)
    print(f"{a.label} allocation, S={S:g}{', ' + text if text else ''}: overall {alloc.overall:.6f}")
    if learning is not None:
        _print_learning(learning, alloc, stats)
        return 0
    split = alloc.meta.get("expert_split")
    print("block  sparsity" + ("  routed experts (least … most pruned)" if split else ""))
    for i, s in enumerate(alloc.block_sparsity):
        rows = (stats.layer_block == i) & (stats.layer_expert >= 0) if split else None
        extra = (f"  {alloc.layer_sparsity[rows].min():.4f} … {alloc.layer_sparsity[rows].max():.4f}"
                 if split and rows.any() else "")
        print(f"{i:5d}  {s:.4f}{extra}")
    return 0


def cmd_predict(args) -> int:
    """Predicted WikiText-2-style perplexity of allocations from the damage table (built first when missing)."""
    from pruner.engine.artifacts import allocation_for
    from pruner.predictor.cache import get_damage_table
    from pruner.predictor.table import PredictorSpec

    try:
        S = check_sparsity(args.sparsity)
        spec = PredictorSpec(stats_spec_from(args), method=args.method, windows=args.windows,
                             window_tokens=args.window_tokens, around=S if args.around else None)
    except ValueError as err:
        raise BadInput(str(err)) from err
    if args.background:
        from pruner.jobs.queue import JobStore, default_db, submit
        from pruner.jobs.workflows import PredictorRequest

        job = submit(JobStore(default_db(cache_arg(args))), PredictorRequest(spec, data_dir=spec.stats.calib.data_dir),
                     cache_dir=cache_arg(args))
        return queued(job, "damage table of the perplexity predictor")
    table = get_damage_table(spec, cache_arg(args), data_dir=spec.stats.calib.data_dir,
                             progress=progress_bar("damage table (blocks, then compounding probes)", "step"))
    names = [n for n, a in ALLOCATORS.items() if not a.learned] if args.allocator == "all" else [args.allocator]
    if args.allocator == "all":  # each allocator takes the flags it declares
        given = {n: getattr(args, n) for n in declared_params() if getattr(args, n, None) is not None}
    else:
        given, _ = params_from_args(args, args.allocator, None)
    rows = []
    for name in names:
        try:
            _, alloc = allocation_for(spec.stats, name, S, ALLOCATORS[name].pick(given), cache_dir=cache_arg(args))
            p = table.predict_allocation(alloc.block_sparsity, alloc.layer_sparsity)
            rows.append({"allocator": name, "params": alloc.params, "perplexity": p.perplexity, "low": p.low,
                         "high": p.high})
        except ValueError as err:
            rows.append({"allocator": name, "error": str(err)})
    if args.tune:
        from pruner.engine.artifacts import get_stats
        from pruner.predictor.tuning import tune_parameters

        stats = get_stats(spec.stats, cache_arg(args))
        for r in rows:
            if ALLOCATORS[r["allocator"]].params:
                try:
                    r["tuned"] = tune_parameters(table, stats, r["allocator"], S)
                except ValueError as err:
                    r["tuned"] = {"error": str(err)}
    if args.json:
        print(json.dumps({"predictor_key": spec.key(), "sparsity": S, "around": spec.around,
                          "reference_perplexity": table.dense_perplexity,
                          "predictions": rows}, indent=2))
        return 0
    reference = "dense" if spec.around is None else f"every block at {spec.around:g}"
    print(f"Predicted perplexity at S={S:g} ({spec.method} masks; {reference} {table.dense_perplexity:.2f} on "
          f"{spec.windows} × {spec.window_tokens} held-out WikiText-2 validation tokens; 95% interval over those "
          f"windows; additive single-block damages — see pruner/predictor.py), predictor key {spec.key()}")
    for r in rows:
        label = ALLOCATORS[r["allocator"]].label
        if "error" in r:
            print(f"  {label:14s} not predicted: {r['error']}")
        else:
            text = params_text(r["params"], ALLOCATORS[r["allocator"]].params)
            print(f"  {label:14s} {r['perplexity']:10.2f} [{r['low']:.2f}, {r['high']:.2f}]"
                  + (f"  ({text})" if text else ""))
        t = r.get("tuned")
        if t and "error" not in t:
            tuned = params_text(t["params"], ALLOCATORS[r["allocator"]].params)
            print(f"  {'':14s} {t['predicted']:10.2f} tuned: {tuned} (best of {t['tried'] - t['skipped']} "
                  f"allowed on the grid)")
        elif t:
            print(f"  {'':14s} not tuned: {t['error']}")
    return 0


def _print_learning(result: dict, alloc, stats) -> None:
    """BESA's per-block learning report: learned mean, shift, reconstruction errors, per-layer sparsities."""
    settings = result.get("settings", {})
    print(f"learned in {result['seconds']:.0f} s" + (f" ({settings['epochs']} epochs, {result['steps_per_block']} steps "
                                                     "per block)" if "epochs" in settings and "steps_per_block" in result
                                                     else ""))
    if "history" in result:  # the search: its seeds, then every generation
        _print_search(result)
        return
    if "error_hard" not in result:
        return
    print("E: the block's squared error ÷ its own contribution ‖Y − X‖², with hard Wanda masks")
    names = [n for n, b in zip(stats.layer_names, stats.layer_block) if b == 0]
    print("block  learned  shift   E BESA  E uniform  " + "  ".join(f"{n.split('.')[-1]:>9}" for n in names))
    for i in range(stats.n_blocks):
        layer = alloc.layer_sparsity[np.asarray(stats.layer_block) == i]
        print(f"{i:5d}  {result['learned_mean'][i]:.4f}  {result['shift'][i]:+.4f}  {result['error_hard'][i]:.4f}  "
              f"{result['error_uniform'][i]:9.4f}  " + "  ".join(f"{v:9.4f}" for v in layer))


def _print_search(result: dict) -> None:
    """The search's report: what each seed scored, then per generation the parent's fitness, the measured children's
    median, whether the parent changed and the table's rank correlation so far."""
    seeds = {k: v for k, v in result["seeds"].items() if k != "chosen"}
    print("seed fitness (KL per token, stage 2): " + ", ".join(f"{k} {v['fitness']:.5f}" for k, v in seeds.items())
          + f"; started from {result['seeds']['chosen']}"
          + (f"; resumed from generation {result['resumed_from']}" if result.get("resumed_from") is not None else ""))
    from pruner.predictor.search import generation_rank_correlations

    # (an allocation learned before the pairs were kept has only the running ρ)
    within = (generation_rank_correlations(result["history"], result["pairs"]) if "pairs" in result
              else [None] * len(result["history"]))
    print("generation  best KL   median KL  replaced  table ρ (this generation, all so far)")
    for h, r in zip(result["history"], within):
        rho = "    –" if r is None else f"{r:+.2f}"
        rho += "" if h["rank_correlation"] is None else f"  {h['rank_correlation']:+.3f}"
        print(f"{h['generation']:10d}  {h['best']:.5f}  {h['median']:.5f}  {'yes' if h['replaced'] else 'no':>8}  {rho}")
    known = [r for r in within if r is not None]
    print(f"{result['forward_tokens']:,} calibration tokens scored; predicted perplexity "
          f"{result['predicted_perplexity']:.2f} (damage table around S)"
          + (f"; the table's ρ within a generation, mean {sum(known) / len(known):+.2f}" if known else ""))


def add_parsers(sub) -> None:
    """Its commands' subparsers."""

    p = sub.add_parser("model", help="what the model's blocks hold: prunable layers, routed experts, and every weight "
                                     "that is not pruned, with the reason (no weights loaded)")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, local folder or hub id (owner/name)")
    p.add_argument("--cache-dir", help="cache folder (default: $PRUNER_CACHE_DIR, else <project>/cache)")
    p.set_defaults(dtype="float32", device="cpu", trust_remote_code=False, offload_activations=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model)


    p = sub.add_parser("stats", help="outlier statistics of the dense model; prints the per-block LOD")
    add_common(p)
    p.add_argument("--m", type=float, action="append", help=f"outlier threshold M (repeatable; default {DEFAULT_TABLE_M})")
    add_stream_flag(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)


    p = sub.add_parser("allocate", help="per-block and per-layer sparsities (learned allocators: learned first)")
    add_common(p)
    p.add_argument("--allocator", default="owl", choices=list(ALLOCATORS),
                   help="; ".join(f"{n}: {a.description}" for n, a in ALLOCATORS.items()))
    p.add_argument("--sparsity", type=float, required=True, help="target sparsity S in (0, 1)")
    add_param_flags(p, methods=False)
    add_expert_flags(p)
    add_stream_flag(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_allocate)


    from pruner.predictor.table import DEFAULT_WINDOW_TOKENS, DEFAULT_WINDOWS, TABLE_METHODS
    p = sub.add_parser("predict", help="predicted perplexity of allocations, before pruning (damage table built "
                                       "once per model, calibration set and method)")
    add_common(p)
    p.add_argument("--allocator", default="all", choices=["all"] + [n for n, a in ALLOCATORS.items() if not a.learned],
                   help="one formula allocator, or all of them (default) with their default parameters")
    p.add_argument("--sparsity", type=float, required=True, help="target sparsity S in (0, 1)")
    add_param_flags(p, methods=False)
    p.add_argument("--method", default="wanda", choices=TABLE_METHODS, help="whose masks prune each block")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="held-out WikiText-2 validation windows")
    p.add_argument("--window-tokens", type=int, default=DEFAULT_WINDOW_TOKENS, help="tokens per held-out window")
    p.add_argument("--tune", action="store_true",
                   help="also search each allocator's parameters for the lowest predicted perplexity")
    p.add_argument("--around", action="store_true",
                   help="measure each block's damage with every other block pruned at S (an operating-point table: "
                        "ranks allocations at S far better than the dense-reference table, but is built per S)")
    p.add_argument("--background", action="store_true", help="queue the table's build as a job and return")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)
