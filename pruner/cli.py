"""``python -m pruner ...``: builds specs from argv and calls the same functions the dashboard calls.

Bad input ends with a one-line ``error: ...`` on stderr naming the allowed values, exit code 2, and nothing cached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

from pruner.allocation import ALLOCATORS, check_sparsity
from pruner.data import DataError
from pruner.methods import METHODS
from pruner.models import check_calibration_fits, model_source, resolve_device
from pruner.params import Param, params_text
from pruner.specs import CALIB_PRESETS, DEFAULT_CALIB_PRESET, DTYPES, DEVICES, CalibSpec, ModelSpec, StatsSpec
from pruner.stats import M_GRID
from pruner.store import default_data_dir

EXIT_BAD_INPUT = 2
#: LOD columns printed by `stats` when no --m is given (the thresholds the OWL paper sweeps around its M = 5).
DEFAULT_TABLE_M = (3.0, 5.0, 7.0)
HUB = "hub"


class BadInput(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the allowed values are in argparse's message)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message}\n")


def _data_dir(arg: str | None) -> str | None:
    """--data-dir, else $PRUNER_DATA_DIR, else ../shared/data; 'hub' means load from the Hugging Face hub."""
    value = arg or os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
    if value == HUB:
        return None
    if not Path(value).is_dir():
        raise BadInput(f"data directory {value} does not exist; pass --data-dir DIR (laid out like ../shared/data) "
                       f"or --data-dir hub")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and calibration")
    g.add_argument("--model", default="smollm2-135m", help="bundled name, local folder or hub id (owner/name)")
    g.add_argument("--dtype", default="float32", choices=DTYPES)
    g.add_argument("--device", default="auto", choices=DEVICES)
    g.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    g.add_argument("--preset", default=DEFAULT_CALIB_PRESET, choices=list(CALIB_PRESETS),
                   help="calibration preset (nsamples × seqlen): " +
                        ", ".join(f"{k}={n}×{t}" for k, (n, t) in CALIB_PRESETS.items()))
    g.add_argument("--nsamples", type=int, help="override the preset's number of calibration samples")
    g.add_argument("--seqlen", type=int, help="override the preset's tokens per sample")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-dir", help="local data folder (default: $PRUNER_DATA_DIR or ../shared/data); 'hub' for the hub")
    g.add_argument("--cache-dir", help="cache folder (default: $PRUNER_CACHE_DIR, else <project>/cache)")
    g.add_argument("--batch-size", type=int, default=4, help="calibration mini-batch size (memory vs speed)")
    g.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations between blocks in CPU memory, not on the compute device "
                        "(less GPU memory; the same results; no effect on a CPU-only machine)")


def _add_stream_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", action="store_true",
                   help="read one decoder block at a time from the checkpoint: memory holds one block, not the "
                        "model (the same results)")


def _model_spec(args) -> ModelSpec:
    model = ModelSpec(name=args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                      offload_activations=args.offload_activations)
    model_source(model)  # unknown names and folders that are not models fail here, before anything is loaded
    return model


def _stats_spec(args) -> StatsSpec:
    model = _model_spec(args)
    overrides = {k: v for k, v in (("nsamples", args.nsamples), ("seqlen", args.seqlen)) if v is not None}
    calib = CalibSpec.preset(args.preset, seed=args.seed, data_dir=_data_dir(args.data_dir), **overrides)
    check_calibration_fits(model, calib.seqlen)  # before minutes of work, not after
    if args.batch_size < 1:
        raise BadInput(f"--batch-size must be ≥ 1; got {args.batch_size}")
    return StatsSpec(model=model, calib=calib)


# ---------------------------------------------------------------------------------------------------------------
# Parameter flags, generated from the registries' declarations (pruner.params)


def _declared_params() -> dict[str, tuple[Param, list[str]]]:
    """Every declared parameter of every allocator and method: flag name → (declaration, owners)."""
    out: dict[str, tuple[Param, list[str]]] = {}
    owners = [(f"allocator {n}", a.params) for n, a in ALLOCATORS.items()] + \
             [(f"method {n}", m.params) for n, m in METHODS.items()]
    for owner, params in owners:
        for p in params:
            if p.name in out and out[p.name][0] != p:
                raise RuntimeError(f"two declarations of parameter --{p.name} differ ({out[p.name][1][0]} and "
                                   f"{owner}); give one of them another name")
            out.setdefault(p.name, (p, []))[1].append(owner)
    return out


def _add_param_flags(p: argparse.ArgumentParser, allocators: bool = True, methods: bool = True) -> None:
    g = p.add_argument_group("allocator and method parameters (each applies only to the entries named)")
    for name, (param, owners) in _declared_params().items():
        owners = [o for o in owners if (allocators and o.startswith("allocator")) or (methods and o.startswith("method"))]
        if owners:
            by_kind = {}
            for owner in owners:
                kind, entry = owner.split(" ", 1)
                by_kind.setdefault(kind, []).append(entry)
            applies = "; ".join(f"{kind}{'s' if len(names) > 1 else ''} {', '.join(names)}"
                                for kind, names in by_kind.items())
            g.add_argument(f"--{name}", type=param.kind, default=None, metavar=param.symbol,
                           help=f"{param.symbol}: {param.help}; {param.range_text()}, default {param.default:g} "
                                f"({applies})")


def _add_expert_flags(p: argparse.ArgumentParser) -> None:
    from pruner.allocation import EXPERT_PARAMS, EXPERT_SPLITS

    g = p.add_argument_group("mixture-of-experts models: how a block's sparsity is shared among its routed experts")
    g.add_argument("--expert-split", default="uniform", choices=list(EXPERT_SPLITS),
                   help="; ".join(f"{n}: {text}" for n, text in EXPERT_SPLITS.items()))
    for param in EXPERT_PARAMS:
        g.add_argument(f"--{param.name.replace('_', '-')}", dest=param.name, type=param.kind, default=None,
                       metavar=param.symbol, help=f"{param.symbol}: {param.help}; {param.range_text()}, default "
                                                  f"{param.default:g} (with --expert-split outliers or routing)")


def _expert_from_args(args) -> tuple[str, dict]:
    """(expert split, its parameters) from the flags; a parameter flag without a split that takes it is an error."""
    from pruner.allocation import EXPERT_PARAMS, check_expert_split

    given = {p.name: getattr(args, p.name) for p in EXPERT_PARAMS if getattr(args, p.name, None) is not None}
    if args.expert_split == "uniform" and given:
        raise BadInput(f"{', '.join('--' + n.replace('_', '-') for n in given)} applies only with --expert-split "
                       "outliers or routing")
    if args.expert_split == "routing" and "expert_m" in given:
        raise BadInput("--expert-m applies only with --expert-split outliers (routing ranks experts by tokens)")
    try:
        return args.expert_split, check_expert_split(args.expert_split, given)
    except ValueError as err:
        raise BadInput(str(err)) from err


def _params_from_args(args, allocator: str | None, method: str | None) -> tuple[dict, dict]:
    """(allocator parameters, method parameters) from the flags; a flag that neither takes is an error."""
    a_params = ALLOCATORS[allocator].params if allocator else ()
    m_params = METHODS[method].params if method else ()
    given = {name: getattr(args, name) for name in _declared_params() if getattr(args, name, None) is not None}
    stray = [n for n in given if n not in {p.name for p in a_params + m_params}]
    if stray:
        takes = [f"allocator {allocator} takes {', '.join(f'--{p.name}' for p in a_params) or 'no parameters'}"]
        if method:
            takes.append(f"method {method} takes {', '.join(f'--{p.name}' for p in m_params) or 'no parameters'}")
        raise BadInput(f"{', '.join('--' + n for n in stray)} does not apply here: {'; '.join(takes)}")
    return ({p.name: given[p.name] for p in a_params if p.name in given},
            {p.name: given[p.name] for p in m_params if p.name in given})


def _check_m(m: float) -> float:
    if not (M_GRID[0] <= m <= M_GRID[-1]):
        raise BadInput(f"M must be in [{M_GRID[0]:g}, {M_GRID[-1]:.0f}]; got {m:g}")
    return m


def _progress_bar(label: str, unit: str = "block"):
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done: int, total: int):
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=label, unit=unit, file=sys.stderr)
        bar["bar"].update(done - bar["bar"].n)
        if done == total:
            bar["bar"].close()

    return update


def _cache(args) -> Path | None:
    """--cache-dir, else $PRUNER_CACHE_DIR (as the dashboard reads it), else None: the project's cache/."""
    value = getattr(args, "cache_dir", None) or os.environ.get("PRUNER_CACHE_DIR")
    return Path(value) if value else None


def cmd_model(args) -> int:
    """What the model is made of: blocks, prunable layers (routed experts included) and every block weight that is not
    pruned, with the reason. Reads only the config and shapes (no weights are loaded)."""
    from pruner.anatomy import UNSUPPORTED, not_pruned_text
    from pruner.models import load_model, model_summary

    spec = _model_spec(args)
    s = model_summary(load_model(spec, _cache(args), stream=True))
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
    from pruner.api import get_stats

    ms = [_check_m(m) for m in (args.m or DEFAULT_TABLE_M)]
    spec = _stats_spec(args)
    stats = get_stats(spec, _cache(args), progress=_progress_bar("outlier statistics"), batch_size=args.batch_size,
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
    from pruner.api import allocation_for, cached_learned

    try:
        S = check_sparsity(args.sparsity)
    except ValueError as err:
        raise BadInput(str(err)) from err
    params, _ = _params_from_args(args, args.allocator, None)
    params = ALLOCATORS[args.allocator].check(params)
    split, split_params = _expert_from_args(args)
    spec = _stats_spec(args)
    a = ALLOCATORS[args.allocator]
    stats, alloc = allocation_for(spec, args.allocator, S, params, cache_dir=_cache(args), expert_split=split,
                                  expert_params=split_params,
                                  progress=_progress_bar("learning " + a.label if a.learned else "outlier statistics",
                                                         "step" if args.allocator == "predicted" else "block"),
                                  batch_size=args.batch_size, stream=args.stream)
    learning = cached_learned(spec, args.allocator, S, params, _cache(args)) if a.learned else None
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
    from pruner.api import allocation_for
    from pruner.predictor import PredictorSpec, get_damage_table

    try:
        S = check_sparsity(args.sparsity)
        spec = PredictorSpec(_stats_spec(args), method=args.method, windows=args.windows,
                             window_tokens=args.window_tokens, around=S if args.around else None)
    except ValueError as err:
        raise BadInput(str(err)) from err
    if args.background:
        from pruner.jobs import JobStore, default_db, submit
        from pruner.workflows import PredictorRequest

        job = submit(JobStore(default_db(_cache(args))), PredictorRequest(spec, data_dir=spec.stats.calib.data_dir),
                     cache_dir=_cache(args))
        return _queued(job, "damage table of the perplexity predictor")
    table = get_damage_table(spec, _cache(args), data_dir=spec.stats.calib.data_dir,
                             progress=_progress_bar("damage table (blocks, then compounding probes)", "step"))
    names = [n for n, a in ALLOCATORS.items() if not a.learned] if args.allocator == "all" else [args.allocator]
    if args.allocator == "all":  # each allocator takes the flags it declares
        given = {n: getattr(args, n) for n in _declared_params() if getattr(args, n, None) is not None}
    else:
        given, _ = _params_from_args(args, args.allocator, None)
    rows = []
    for name in names:
        try:
            _, alloc = allocation_for(spec.stats, name, S, ALLOCATORS[name].pick(given), cache_dir=_cache(args))
            p = table.predict_allocation(alloc.block_sparsity, alloc.layer_sparsity)
            rows.append({"allocator": name, "params": alloc.params, "perplexity": p.perplexity, "low": p.low,
                         "high": p.high})
        except ValueError as err:
            rows.append({"allocator": name, "error": str(err)})
    if args.tune:
        from pruner.api import get_stats
        from pruner.predictor import tune_parameters

        stats = get_stats(spec.stats, _cache(args))
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
    if "error_hard" not in result:
        return
    print("E: the block's squared error ÷ its own contribution ‖Y − X‖², with hard Wanda masks")
    names = [n for n, b in zip(stats.layer_names, stats.layer_block) if b == 0]
    print("block  learned  shift   E BESA  E uniform  " + "  ".join(f"{n.split('.')[-1]:>9}" for n in names))
    for i in range(stats.n_blocks):
        layer = alloc.layer_sparsity[np.asarray(stats.layer_block) == i]
        print(f"{i:5d}  {result['learned_mean'][i]:.4f}  {result['shift'][i]:+.4f}  {result['error_hard'][i]:.4f}  "
              f"{result['error_uniform'][i]:9.4f}  " + "  ".join(f"{v:9.4f}" for v in layer))


#: What a workflow phase counts, where it is not transformer blocks (the phase names of ``pruner.workflows``).
PHASE_UNITS = {"perplexity": "chunk", "zero-shot tasks": "task", "dense zero-shot tasks": "task",
               "damage table": "step", "LoRA steps": "step"}


def phase_bars():
    """A workflow ``Context.progress`` that draws one tqdm bar per phase on stderr (calibration, learning, pruning,
    evaluation), each opened when its phase first reports."""
    bars = {}

    def update(phase: str, done: int, total: int):
        if phase not in bars:
            bars[phase] = _progress_bar(phase, PHASE_UNITS.get(phase, "block"))
        bars[phase](done, total)

    return update


def _print_ppl(label: str, r: dict) -> None:
    """One perplexity with its evaluation interval (over chunks) and whether the evaluation was partial."""
    part = f" (partial: first {r['chunks']} of {r['chunks_total']} chunks)" if r["partial"] else ""
    ci = r.get("interval") or {}
    interval = (f" [{ci['low']:.3f}, {ci['high']:.3f}] ({ci['confidence']:.0%} evaluation interval over "
                f"{ci['n']} chunks)" if ci.get("low") is not None else " (one chunk: no evaluation interval)"
                if ci else "")
    source = f"; taken from the stored {r['derived_from']}" if r.get("derived_from") else ""
    print(f"{label}: WikiText-2 test perplexity {r['perplexity']:.3f}{interval} at seqlen {r['seqlen']}{part}; "
          f"{r['tokens_per_second']:.0f} tokens/s{source}")


def _check_chunks(args) -> None:
    if args.max_chunks is not None and args.max_chunks < 1:
        raise BadInput(f"--max-chunks must be ≥ 1; got {args.max_chunks}")
    if getattr(args, "seqlen_eval", None) is not None and args.seqlen_eval < 2:
        raise BadInput(f"--eval-seqlen must be ≥ 2; got {args.seqlen_eval}")


def _perplexity_options(args):
    from pruner.workflows import PerplexityOptions

    return PerplexityOptions(max_chunks=args.max_chunks, seqlen=getattr(args, "seqlen_eval", None),
                             stream=getattr(args, "stream", False))


def _queued(job: int, what: str) -> int:
    print(f"job {job} queued: {what} (follow it with `python -m pruner jobs list`)")
    return 0


def cmd_prune(args) -> int:
    import shutil

    from pruner.methods import NM
    from pruner.runs import read_run
    from pruner.specs import PruneSpec
    from pruner.store import atomic_dir
    from pruner.workflows import Context, PruneRequest, run

    if args.nm is not None:
        try:
            nm = NM.parse(args.nm)
        except ValueError as err:
            raise BadInput(str(err)) from err
        sparsity = nm.sparsity if args.sparsity is None else args.sparsity
    elif args.sparsity is None:
        raise BadInput("--sparsity is required (a number in (0, 1)) unless --nm gives it")
    else:
        sparsity = args.sparsity
    _check_chunks(args)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise BadInput(f"--out {out} exists and is not empty; choose a new folder")
    if args.seeds < 1:
        raise BadInput(f"--seeds must be ≥ 1 (calibration seeds --seed, --seed + 1, ...); got {args.seeds}")
    if args.tune and args.seeds > 1:
        raise BadInput("--tune picks parameters per calibration set, which would split the seeds into different "
                       "groups: tune once (`predict --tune`), then prune the seeds with the tuned flags")
    if args.drop_weights and not args.ppl:
        raise BadInput("--drop-weights keeps only the run's evaluations: add --ppl (or keep the weights)")
    if args.drop_weights and out is not None:
        raise BadInput("--out copies the weights that --drop-weights deletes: choose one")
    if out is not None and args.seeds > 1:
        raise BadInput("--out copies one run; with --seeds N > 1 choose the seed with --seed and --seeds 1")
    stats_spec = _stats_spec(args)
    a_params, m_params = _params_from_args(args, args.allocator, args.method)
    split, split_params = _expert_from_args(args)
    # one run per calibration seed: a run group (pruner.groups), summarised with its seed interval
    specs = [PruneSpec(model=stats_spec.model, calib=dataclasses.replace(stats_spec.calib, seed=args.seed + i),
                       allocator=args.allocator, method=args.method, sparsity=sparsity, allocator_params=a_params,
                       method_params=m_params, nm=args.nm, scope=args.scope,
                       leave_unsupported_dense=args.leave_unsupported_dense, expert_split=split,
                       expert_params=split_params) for i in range(args.seeds)]
    requests = [PruneRequest(spec, perplexity=_perplexity_options(args) if args.ppl else None,
                             data_dir=stats_spec.calib.data_dir, force=args.force, batch_size=args.batch_size,
                             stream=args.stream, tune=args.tune, drop_weights=args.drop_weights)
                for spec in specs]
    if args.background:
        from pruner.jobs import JobStore, default_db, submit

        store = JobStore(default_db(_cache(args)))
        for request in requests:
            _queued(submit(store, request, cache_dir=_cache(args)), request.label())
        return 0
    folders = []
    for spec, request in zip(specs, requests):
        result = run(request, Context(_cache(args), progress=phase_bars(), device=str(resolve_device(args.device))))
        folder = Path(result["folder"])
        folders.append(folder)
        manifest = read_run(folder)
        print(f"run {manifest.key}: {manifest.label}" + (f", calibration seed {spec.calib.seed}" if args.seeds > 1 else ""))
        if "tuning" in result:
            t = result["tuning"]
            print(f"  parameters tuned on the perplexity predictor ({t['tried']} tried): {manifest.parameters_text()},"
                  f" predicted perplexity {t['predicted_perplexity']:.2f}")
            if t.get("caveat"):
                print(f"  caveat: {t['caveat']}")
        print(f"  folder {folder}")
        print(f"  achieved sparsity {manifest.achieved_overall:.6f} of the pruned weights (target {sparsity:g})"
              + (f", {manifest.achieved_decoder:.6f} of all decoder-block weights"
                 if manifest.achieved_decoder is not None else "") + f"; prune {manifest.timings['prune']:.1f} s")
        for line in manifest.accounting_lines():
            print(f"  {line}")
        if "perplexity" in result["details"]:
            _print_ppl("  pruned", result["details"]["perplexity"])
    if args.seeds > 1 and args.ppl:
        from pruner.groups import group_runs
        from pruner.metrics import perplexity_metric_name

        (group,) = group_runs([read_run(f) for f in folders])
        metric = perplexity_metric_name(result["details"]["perplexity"])
        print(f"group of {args.seeds} calibration seeds ({', '.join(map(str, group.seeds))}): perplexity "
              f"{group.summary(metric).text()}")
    if out is not None:
        if out.exists():
            out.rmdir()
        with atomic_dir(out) as tmp:
            shutil.copytree(folders[0], tmp, dirs_exist_ok=True)
        print(f"  copied to {out}")
    return 0


def _grid_axes(args) -> dict[str, list[float]]:
    """--grid NAME=V1,V2,… (repeatable) and single parameter flags, as the sweep's parameter axes."""
    declared = _declared_params()
    axes = {name: [getattr(args, name)] for name in declared if getattr(args, name, None) is not None}
    for item in args.grid or []:
        name, sep, values = item.partition("=")
        name = name.strip().lstrip("-")
        if not sep or name not in declared:
            raise BadInput(f"--grid takes NAME=V1,V2,… with NAME a declared parameter ({', '.join(declared)}); "
                           f"got {item!r}")
        try:
            axes[name] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError as err:
            raise BadInput(f"--grid {item!r}: values must be numbers separated by commas") from err
    return axes


def cmd_sweep(args) -> int:
    from pruner.jobs import JobStore, default_db
    from pruner.specs import PruneSpec
    from pruner.sweep import SweepRequest, executor_for, wait_for

    _check_chunks(args)
    stats_spec = _stats_spec(args)
    allocators, methods = args.allocators or ["owl"], args.methods or ["wanda"]
    base = PruneSpec(model=stats_spec.model, calib=stats_spec.calib, allocator=allocators[0], method=methods[0],
                     sparsity=check_sparsity(args.sparsities[0]))
    sweep = SweepRequest(base, allocators=tuple(allocators), methods=tuple(methods),
                         sparsities=tuple(args.sparsities), seeds=args.seeds, params=_grid_axes(args),
                         perplexity=_perplexity_options(args) if args.ppl else None,
                         data_dir=stats_spec.calib.data_dir, batch_size=args.batch_size, stream=args.stream)
    ray_settings = {"cpus_per_cell": args.cpus_per_cell}
    if args.ray_node_cache:
        ray_settings["node_cache"] = args.ray_node_cache
    if args.ray_shared_cache != "detect":
        ray_settings["shared_cache"] = args.ray_shared_cache == "yes"
    executor = executor_for(args.ray, **ray_settings)
    store = JobStore(default_db(_cache(args)))
    ids = executor.submit(store, sweep, _cache(args))
    print(f"{sweep.label()}: {len(ids)} job(s) queued on the {executor.name} executor (jobs {ids[0]}–{ids[-1]}; "
          f"follow them with `python -m pruner jobs list`)", flush=True)
    if args.no_wait:
        return 0

    def show(job):
        where = f" [{job.remote['node']} pid {job.remote['pid']}]" if job.remote else ""
        step = f" {job.phase} {job.done}/{job.total}" if job.total else (f" {job.phase}" if job.phase else "")
        print(f"job {job.id} {job.state}{where}:{step} {job.label}", flush=True)

    jobs = wait_for(store, ids, on_change=show)
    rows = []
    for j in jobs:
        row = {"job": j.id, "kind": j.kind, "state": j.state, "label": j.label}
        if j.result:
            row.update({k: j.result[k] for k in ("run", "perplexity") if k in j.result})
        if j.error:
            row["error"] = j.error.splitlines()[0]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'job':>4}  {'state':<9} {'run':<17} {'perplexity':>11}  what")
        for r in rows:
            ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else ""
            print(f"{r['job']:>4}  {r['state']:<9} {r.get('run', ''):<17} {ppl:>11}  {r['label']}"
                  + (f"\n      error: {r['error']}" if "error" in r else ""))
    return 0 if all(j.state == "done" for j in jobs) else 1


def _print_zeroshot(label: str, r: dict) -> None:
    from pruner.evaluate.zeroshot import TASKS
    from pruner.intervals import mean_accuracy_stderr

    part = f" (partial: first {r['limit']} documents per task)" if r["partial"] else ""
    def pm(se):
        return "" if se is None else f" ± {se:.3f}"

    cells = ", ".join(f"{TASKS[t].label} {v['acc']:.3f}{pm(v.get('acc_stderr'))}" for t, v in r["tasks"].items())
    print(f"{label}: zero-shot accuracy{part}: {cells}; mean {r['mean_acc']:.3f}{pm(mean_accuracy_stderr(r['tasks']))}"
          f" over {len(r['tasks'])} tasks (± standard error over the documents; lm-eval {r['lm_eval']})")


def _print_speed(label: str, r: dict) -> None:
    s = r["spec"]
    print(f"{label}: {r['engine']} on {r['env']['cpu']} ({', '.join(r['env']['flags'])}), {s['threads']} threads, "
          f"B={s['batch']}, T={s['seqlen']}, median of {s['runs']}"
          + (f" in {s['rounds']} rounds, dense and pruned in turn" if s.get("rounds") else ""))
    for graph, row in r["graphs"].items():
        cells = [f"{name} {row[name]['median_ms']:.2f} ms" for name in ("dense", "pruned") if row.get(name)]
        speedup = r["speedup"].get(graph)
        by_round = (r.get("speedup_by_round") or {}).get(graph)
        rounds = f" (per round {min(by_round):.2f}–{max(by_round):.2f}×)" if by_round else ""
        print(f"  {graph}: " + ", ".join(cells) + (f", speed-up {speedup:.2f}×{rounds}" if speedup else ""))
    if not r["deepsparse_available"]:
        print(f"  DeepSparse not used: {r['deepsparse_reason']}")
    if r.get("ideal_decode_speedup_estimate"):
        print(f"  estimate (not a measurement): ideal decode speed-up {r['ideal_decode_speedup_estimate']:.2f}× "
              f"from the weights removed")
    for reason in r["rejected"]:
        print(f"  rejected: {reason}")


def _speed_spec(args):
    from pruner.evaluate.speed import SpeedSpec

    return SpeedSpec(batch=args.speed_batch, seqlen=args.speed_seqlen, threads=args.threads, runs=args.runs,
                     rounds=args.rounds)


def cmd_eval(args) -> int:
    from pruner import metrics

    if not (args.ppl or args.zeroshot or args.speed):
        raise BadInput("nothing to evaluate: pass --ppl (WikiText-2 perplexity), --zeroshot (lm-eval accuracy) "
                       "and/or --speed (DeepSparse CPU speed-up, needs --run)")
    _check_chunks(args)
    if args.limit is not None and args.limit < 1:
        raise BadInput(f"--limit must be ≥ 1 (documents per task); got {args.limit}")
    tasks = None
    if args.tasks:
        from pruner.evaluate.zeroshot import parse_tasks

        tasks = parse_tasks(args.tasks)
    speed_spec = _speed_spec(args) if args.speed else None
    if args.speed and not args.run:
        raise BadInput("--speed compares a pruned run with its dense model: pass --run KEY")
    if args.stream and (args.zeroshot or args.speed or not args.ppl):
        raise BadInput("--stream applies to --ppl only; zero-shot accuracy and speed need the whole model in memory")
    data_dir = _data_dir(args.data_dir) if (args.ppl or args.zeroshot) else None
    source = "hub" if (args.zeroshot and data_dir is None) else "local"
    device = str(resolve_device(args.device))
    results = {}
    if args.run:
        from pruner.runs import run_folder
        from pruner.workflows import Context, EvalRequest, ZeroshotOptions, run

        run_folder(args.run, _cache(args))  # a key that is no key, or no such run: one line, before any work
        request = EvalRequest(args.run, perplexity=_perplexity_options(args) if args.ppl else None,
                              zeroshot=ZeroshotOptions(tuple(tasks) if tasks else None, args.limit, source,
                                                       args.zeroshot_batch)
                              if args.zeroshot else None, speed=speed_spec, engine=args.engine, data_dir=data_dir)
        results = run(request, Context(_cache(args), progress=phase_bars(), device=device))["details"]
        for name, show in (("perplexity", _print_ppl), ("zeroshot", _print_zeroshot), ("speed", _print_speed)):
            if name in results:
                show(f"run {args.run}", results[name])
    else:
        model = ModelSpec(name=args.model, dtype=args.dtype, device=args.device,
                          trust_remote_code=args.trust_remote_code)
        model_source(model)
        if args.ppl:
            from pruner.models import load_model

            loaded = load_model(model, _cache(args), stream=True) if args.stream else None
            results["perplexity"] = metrics.dense_perplexity(model, data_dir, _cache(args), max_chunks=args.max_chunks,
                                                             seqlen=args.seqlen_eval, loaded=loaded,
                                                             progress=_progress_bar("perplexity"))
            _print_ppl(f"dense {args.model}", results["perplexity"])
        if args.zeroshot:
            results["zeroshot"] = metrics.dense_zeroshot(model, data_dir, _cache(args), tasks=tasks, limit=args.limit,
                                                         source=source, batch_size=args.zeroshot_batch,
                                                         progress=_progress_bar("zero-shot tasks"))
            _print_zeroshot(f"dense {args.model}", results["zeroshot"])
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_recover(args) -> int:
    """LoRA-recover a stored run; store it as a new run; print perplexity before and after (same chunks)."""
    from pruner.recover import RecoverSpec
    from pruner.runs import read_run, run_folder
    from pruner.workflows import Context, RecoverRequest, run

    run_folder(args.run, _cache(args))
    _check_chunks(args)
    spec = RecoverSpec(args.run, steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
                       seqlen=args.train_seqlen, batch=args.train_batch)
    request = RecoverRequest(spec, perplexity=None if args.no_ppl else _perplexity_options(args),
                             data_dir=_data_dir(args.data_dir), force=args.force)
    if args.background:
        from pruner.jobs import JobStore, default_db, submit

        return _queued(submit(JobStore(default_db(_cache(args))), request, cache_dir=_cache(args)), request.label())
    result = run(request, Context(_cache(args), progress=phase_bars(), device=str(resolve_device(args.device))))
    from pruner.runs import LORA_SUBFOLDER

    recovered = read_run(run_folder(result["run"], _cache(args)))
    rec = recovered.recovery
    print(f"run {recovered.key}: {recovered.label} (parent {args.run})")
    print(f"  folder {run_folder(recovered.key, _cache(args))} (adapters in {LORA_SUBFOLDER}/, not merged: the pruned weights "
          f"are unchanged)")
    print(f"  {rec['trainable_params']:,} adapter parameters; training loss {rec['loss_first']:.3f} → "
          f"{rec['loss_last']:.3f} (mean of the first and last tenth of {len(rec['losses'])} steps); {rec['seconds']:.0f} s")
    for name, label in (("perplexity_before", "  before (pruned)"), ("perplexity", "  after LoRA")):
        if name in result["details"]:
            _print_ppl(label, result["details"][name])
    return 0


def _drop_weights(layout, keys: list[str]) -> int:
    """``cache --drop-weights KEY ...``: keep each named run's manifest and metrics, remove its weight files."""
    from pruner.cache import check_key
    from pruner.runs import drop_weights, read_run

    folders = []
    for key in keys:  # every key checked before anything is removed
        folder = layout.run(check_key(key))
        if not (folder / "manifest.json").is_file():
            raise BadInput(f"--drop-weights takes keys of runs in {layout.root / 'runs'}; no run {key!r}")
        if not read_run(folder).metrics:
            raise BadInput(f"run {key} has no evaluation yet: dropping its weights would leave nothing; evaluate it "
                           "first (`eval --run KEY --ppl`)")
        folders.append(folder)
    freed = 0
    for folder in folders:
        n = drop_weights(folder)
        freed += n
        print(f"run {folder.name}: weights dropped ({n / 2**20:.1f} MiB); manifest and metrics kept")
    print(f"freed {freed / 2**30:.2f} GiB")
    return 0


def cmd_cache(args) -> int:
    """List the cache's entries per kind with sizes; remove stale ones (--stale) or named ones (--remove)."""
    from pruner.cache import KINDS, CacheLayout

    layout = CacheLayout.at(_cache(args))
    if args.drop_weights:
        return _drop_weights(layout, args.drop_weights)
    entries = layout.entries()
    chosen = []
    if args.remove:
        by_name = {e.path.name.removesuffix(".zip"): e for e in entries
                   if e.kind in ("runs", "stats", "learned", "predictors")}
        for name in args.remove:
            if name in KINDS:
                chosen += [e for e in entries if e.kind == name]
            elif name in by_name:
                chosen.append(by_name[name])
                if by_name[name].kind == "runs":  # its zip goes with it
                    chosen += [e for e in entries if e.kind == "exports" and e.path.stem == name]
            else:
                raise BadInput(f"--remove takes a kind ({', '.join(KINDS)}) or the key of a run, statistics or "
                               f"learned allocation in {layout.root}; got {name!r}")
    if args.stale:
        chosen += [e for e in entries if e.stale]
    if chosen:
        freed = layout.remove(sorted({e.path for e in chosen}))
        for e in chosen:
            print(f"removed {e.kind}/{e.path.name} ({e.bytes / 2**20:.1f} MiB){': ' + e.stale if e.stale else ''}")
        print(f"freed {freed / 2**30:.2f} GiB")
        return 0
    print(f"cache {layout.root}")
    print(f"{'kind':<10} {'entries':>7} {'size':>10} {'stale':>6} {'stale size':>11}  holds")
    for kind, what in KINDS.items():
        mine = [e for e in entries if e.kind == kind]
        stale = [e for e in mine if e.stale]
        print(f"{kind:<10} {len(mine):>7} {sum(e.bytes for e in mine) / 2**20:>8.1f} M {len(stale):>6} "
              f"{sum(e.bytes for e in stale) / 2**20:>9.1f} M  {what}")
    from pruner.runs import list_runs

    slim = [r for r in list_runs(layout.root).runs if r.weights_dropped]
    if slim:
        print(f"  {len(slim)} of the runs keep only their manifest and metrics (weights dropped after evaluation)")
    for e in entries:
        if e.stale:
            print(f"  stale: {e.kind}/{e.path.name}: {e.stale}")
    for other in layout.others():
        print(f"  not the cache's own (left alone): {other.name}")
    print("`python -m pruner cache --stale` removes the stale entries; `--remove KEY|KIND` removes named ones")
    return 0


def cmd_deepsparse_env(args) -> int:
    from pruner.evaluate.deepsparse_env import deepsparse_status, ensure_deepsparse_env

    if args.check:
        status = deepsparse_status()
        print("DeepSparse available" if status["available"] else f"DeepSparse not available: {status['reason']}")
        return 0 if status["available"] else 1
    try:
        ensure_deepsparse_env(print)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_jobs(args) -> int:
    from pruner.jobs import JobStore, default_db, ensure_workers, worker_main

    db = Path(args.db) if args.db else default_db(_cache(args))
    if args.action == "worker":
        worker_main(db, _cache(args))
        return 0
    if args.action == "ray-driver":
        from pruner.ray_exec import RaySettings, drive

        drive(db, [int(i) for i in args.ids.split(",")], RaySettings(**json.loads(args.ray_settings)), _cache(args))
        return 0
    store = JobStore(db)
    ensure_workers(store, cache_dir=_cache(args))  # reaps dead jobs; restarts a worker for queued ones
    if args.action == "cancel":
        if args.id is None:
            raise BadInput("jobs cancel needs a job id")
        try:
            job = store.cancel(args.id)
        except ValueError as err:
            raise BadInput(str(err)) from err
        print(f"job {job.id}: {job.state}{' (cancel requested)' if job.cancel_requested else ''}")
        return 0
    if args.action == "wait":
        if args.id is None:
            raise BadInput("jobs wait needs a job id")
        import time

        while store.get(args.id).state not in ("done", "failed", "cancelled"):
            time.sleep(1)
            store.reap()
    jobs = [store.get(args.id)] if args.id is not None else store.list(args.limit)
    if args.json:
        print(json.dumps([{k: v for k, v in vars(j).items()} for j in jobs], indent=2, default=str))
        return 0
    print(f"{'id':>4}  {'state':<9} {'progress':<22} {'elapsed':>8}  job")
    for j in jobs:
        prog = f"{j.phase or ''} {j.done}/{j.total}" if j.total else ""
        elapsed = f"{j.elapsed:.0f} s" if j.elapsed is not None else ""
        where = (f" [Ray {j.remote['node']} pid {j.remote['pid']}]" if j.remote
                 else " [Ray]" if j.executor == "ray" else "")
        print(f"{j.id:>4}  {j.state:<9} {prog:<22} {elapsed:>8}  {j.label}{where}")
        if j.error and j.state == "failed":
            print(f"      error: {j.error.splitlines()[0]}")
    from pruner.runs import list_runs

    for key, why in list_runs(_cache(args)).broken:  # a job's output that can no longer be read
        print(f"warning: {why}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pruner", description="Layerwise sparsity allocation for LLM pruning")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("model", help="what the model's blocks hold: prunable layers, routed experts, and every weight "
                                     "that is not pruned, with the reason (no weights loaded)")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, local folder or hub id (owner/name)")
    p.add_argument("--cache-dir", help="cache folder (default: $PRUNER_CACHE_DIR, else <project>/cache)")
    p.set_defaults(dtype="float32", device="cpu", trust_remote_code=False, offload_activations=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("stats", help="outlier statistics of the dense model; prints the per-block LOD")
    _add_common(p)
    p.add_argument("--m", type=float, action="append", help=f"outlier threshold M (repeatable; default {DEFAULT_TABLE_M})")
    _add_stream_flag(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("allocate", help="per-block and per-layer sparsities (learned allocators: learned first)")
    _add_common(p)
    p.add_argument("--allocator", default="owl", choices=list(ALLOCATORS),
                   help="; ".join(f"{n}: {a.description}" for n, a in ALLOCATORS.items()))
    p.add_argument("--sparsity", type=float, required=True, help="target sparsity S in (0, 1)")
    _add_param_flags(p, methods=False)
    _add_expert_flags(p)
    _add_stream_flag(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_allocate)

    from pruner.predictor import DEFAULT_WINDOW_TOKENS, DEFAULT_WINDOWS, TABLE_METHODS

    p = sub.add_parser("predict", help="predicted perplexity of allocations, before pruning (damage table built "
                                       "once per model, calibration set and method)")
    _add_common(p)
    p.add_argument("--allocator", default="all", choices=["all"] + [n for n, a in ALLOCATORS.items() if not a.learned],
                   help="one formula allocator, or all of them (default) with their default parameters")
    p.add_argument("--sparsity", type=float, required=True, help="target sparsity S in (0, 1)")
    _add_param_flags(p, methods=False)
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

    from pruner.methods import SCOPES

    p = sub.add_parser("prune", help="prune a copy of the model with an allocator and a method; store the run")
    _add_common(p)
    p.add_argument("--allocator", default="owl", choices=list(ALLOCATORS),
                   help="; ".join(f"{n}: {a.description}" for n, a in ALLOCATORS.items()))
    p.add_argument("--method", default="wanda", choices=list(METHODS),
                   help="; ".join(f"{n}: {m.description}" for n, m in METHODS.items()))
    p.add_argument("--sparsity", type=float, help="target sparsity S in (0, 1) (implied by --nm)")
    _add_param_flags(p)
    _add_expert_flags(p)
    p.add_argument("--nm", help="N:M semi-structured sparsity, e.g. 2:4 (N kept of every M)")
    p.add_argument("--scope", choices=list(SCOPES), help="comparison group (default: the method's own)")
    p.add_argument("--seeds", type=int, default=1,
                   help="prune once per calibration seed --seed, --seed + 1, …: a run group whose perplexity is "
                        "reported with a seed interval (default 1)")
    p.add_argument("--tune", action="store_true",
                   help="choose the allocator's parameters by the perplexity predictor first (held-out validation "
                        "data, never the test split); recorded in the run's manifest")
    p.add_argument("--out", help="also copy the pruned Hugging Face folder here")
    p.add_argument("--force", action="store_true", help="recompute even if this run exists")
    p.add_argument("--leave-unsupported-dense", action="store_true",
                   help="a model whose blocks hold weights the tool cannot prune (e.g. state-space layers) is refused "
                        "with their names; with this flag they stay dense and the manifest lists them")
    p.add_argument("--stream", action="store_true",
                   help="read one decoder block at a time from the checkpoint and write pruned blocks straight to "
                        "the run's shards: memory holds one block, not the model (same pruned weights)")
    p.add_argument("--ppl", action="store_true", help="evaluate WikiText-2 perplexity afterwards")
    p.add_argument("--max-chunks", type=int, help="perplexity on the first N chunks only (a partial estimate)")
    p.add_argument("--drop-weights", action="store_true",
                   help="after the evaluation (--ppl), delete the pruned weights and keep the run's manifest and "
                        "metrics: for studies of many prunes (a run of the same settings restores them with --force)")
    p.add_argument("--background", action="store_true", help="queue it as a background job and return at once")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="evaluate a stored run (--run KEY) or a dense model (--model)")
    _add_common(p)
    p.add_argument("--run", help="run key printed by `prune`")
    p.add_argument("--ppl", action="store_true", help="WikiText-2 test perplexity")
    p.add_argument("--stream", action="store_true",
                   help="perplexity block by block over all chunks, each block read from the run's shards for its "
                        "turn (memory: one block and the chunks' hidden states; same numbers)")
    p.add_argument("--max-chunks", type=int, help="first N chunks only (a partial estimate)")
    p.add_argument("--eval-seqlen", dest="seqlen_eval", type=int, help="evaluation window (default min(2048, context))")
    from pruner.evaluate.speed import DEFAULT_ROUNDS, MIN_RUNS, SpeedSpec
    from pruner.evaluate.zeroshot import TASKS, ZEROSHOT_DEFAULT_BATCH

    g = p.add_argument_group("zero-shot accuracy (lm-eval)")
    g.add_argument("--zeroshot", action="store_true", help="zero-shot accuracy with lm-evaluation-harness")
    g.add_argument("--tasks", help=f"comma-separated subset of: {', '.join(TASKS)} (default: all seven)")
    g.add_argument("--limit", type=int, help="first N documents per task only (a partial result, labelled so)")
    g.add_argument("--zeroshot-batch", type=int, default=ZEROSHOT_DEFAULT_BATCH,
                   help="lm-eval batch size (memory: the longest batch holds batch × tokens × vocabulary logits)")
    g = p.add_argument_group("CPU speed (ONNX export, DeepSparse)")
    g.add_argument("--speed", action="store_true", help="time dense vs pruned in DeepSparse (needs --run)")
    g.add_argument("--engine", default="auto", choices=["auto", "deepsparse", "onnxruntime"],
                   help="auto: DeepSparse if it can run here, else dense ONNX Runtime timings + an estimate")
    g.add_argument("--speed-batch", type=int, default=SpeedSpec.batch, help="batch size B of both graphs")
    g.add_argument("--speed-seqlen", type=int, default=SpeedSpec.seqlen,
                   help="T: prefill length and decode KV-cache length")
    g.add_argument("--threads", type=int, help="CPU threads (default: all)")
    g.add_argument("--runs", type=int, default=MIN_RUNS, help=f"timed calls per graph (≥ {MIN_RUNS}; median)")
    g.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                   help="dense and pruned take turns in this many rounds of the timed calls (1 ≤ rounds ≤ runs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    from pruner.recover import (RECOVER_DEFAULT_ALPHA, RECOVER_DEFAULT_BATCH, RECOVER_DEFAULT_LR, RECOVER_DEFAULT_RANK,
                                RECOVER_DEFAULT_SEQLEN, RECOVER_DEFAULT_STEPS)

    p = sub.add_parser("recover", help="LoRA fine-tune of a pruned run (adapters not merged); stored as a new run")
    p.add_argument("--run", required=True, help="key of the pruned run")
    p.add_argument("--steps", type=int, default=RECOVER_DEFAULT_STEPS, help="optimiser steps")
    p.add_argument("--rank", type=int, default=RECOVER_DEFAULT_RANK, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=RECOVER_DEFAULT_ALPHA, help="LoRA α (update scaled by α/r)")
    p.add_argument("--lr", type=float, default=RECOVER_DEFAULT_LR, help="peak learning rate (warm-up, linear decay)")
    p.add_argument("--train-seqlen", type=int, default=RECOVER_DEFAULT_SEQLEN, help="tokens per training sequence")
    p.add_argument("--train-batch", type=int, default=RECOVER_DEFAULT_BATCH, help="sequences per step")
    p.add_argument("--max-chunks", type=int, help="perplexity before/after on the first N chunks only (partial)")
    p.add_argument("--no-ppl", action="store_true", help="skip the perplexity before and after")
    p.add_argument("--force", action="store_true", help="retrain even if this recovery exists")
    p.add_argument("--background", action="store_true", help="queue it as a background job and return at once")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--data-dir", help="local data folder (default: $PRUNER_DATA_DIR or ../shared/data); 'hub' for the hub")
    p.add_argument("--cache-dir", help="cache folder (default: $PRUNER_CACHE_DIR, else <project>/cache)")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("cache", help="sizes of the cache per kind; remove stale or named entries")
    p.add_argument("--stale", action="store_true", help="remove stale entries (interrupted writes, old formats, "
                                                       "zips of removed runs, ONNX graphs of older export versions)")
    p.add_argument("--remove", nargs="+", metavar="KEY|KIND", help="remove these runs/statistics/learned allocations "
                                                                   "(by key) or every entry of these kinds")
    p.add_argument("--drop-weights", nargs="+", metavar="KEY",
                   help="keep these evaluated runs' manifests and metrics, remove their weights (a prune of the same "
                        "settings with --force restores them)")
    p.add_argument("--cache-dir", help="cache folder (default: $PRUNER_CACHE_DIR, else <project>/cache)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("deepsparse-env", help="create the DeepSparse virtual environment (.venv-deepsparse)")
    p.add_argument("--check", action="store_true", help="only say whether DeepSparse can run (exit 1 if not)")
    p.set_defaults(func=cmd_deepsparse_env)

    p = sub.add_parser("jobs", help="the background job table: list, wait for or cancel jobs")
    p.add_argument("action", choices=["list", "cancel", "wait", "worker", "ray-driver"])
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir", help="cache folder (default: $PRUNER_CACHE_DIR, else <project>/cache)")
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)  # ray-driver: the jobs it runs
    p.add_argument("--ray-settings", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("sweep", help="a grid of prunes (allocators × methods × sparsities × parameters × seeds) on "
                                     "the local workers or a Ray cluster; statistics shared by the cells first")
    _add_common(p)
    p.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS), help="default: owl")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: wanda")
    p.add_argument("--sparsities", nargs="+", type=float, required=True, help="target sparsities S in (0, 1)")
    p.add_argument("--seeds", type=int, default=1, help="calibration seeds --seed, --seed + 1, … per cell")
    _add_param_flags(p)
    p.add_argument("--grid", action="append", metavar="NAME=V1,V2",
                   help="a parameter axis, e.g. --grid lam=0.04,0.08 (repeatable; applies to the cells whose "
                        "allocator or method takes it)")
    _add_stream_flag(p)
    p.add_argument("--ppl", action="store_true", help="evaluate WikiText-2 perplexity of each cell")
    p.add_argument("--max-chunks", type=int, help="perplexity on the first N chunks only (a partial estimate)")
    g = p.add_argument_group("Ray (optional: pip install -e '.[ray]')")
    g.add_argument("--ray", metavar="ADDRESS", help="run the cells as Ray tasks on the cluster at ADDRESS "
                                                    "(host:port of its head, or 'auto' on a node of it)")
    g.add_argument("--cpus-per-cell", type=int, default=1, help="CPUs (torch threads) each Ray task asks for")
    g.add_argument("--ray-shared-cache", choices=["detect", "yes", "no"], default="detect",
                   help="whether the nodes see this cache folder (detect: each task checks a token the driver wrote)")
    g.add_argument("--ray-node-cache", metavar="DIR", help="cache folder on nodes that do not see this one "
                                                          "(default ~/.cache/pruner-ray)")
    p.add_argument("--no-wait", action="store_true", help="queue and return; follow with `jobs list`")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sweep)
    return parser


#: Exit codes of a command stopped by Ctrl-C (SIGINT) or SIGTERM, as a shell reports them (128 + the signal).
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every ``finally`` (temporary folders, hooks) runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return args.func(args)
    except (BadInput, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was kept (completed results stay cached)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("terminated: nothing half-written was kept (completed results stay cached)", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The `pruner` console command (pyproject.toml)."""
    sys.exit(main())
