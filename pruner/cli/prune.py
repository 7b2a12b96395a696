"""Commands that make runs: `prune`, `recover` (LoRA) and `sweep` (a grid of prunes, local or on Ray)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pruner.allocation.formulas import check_sparsity
from pruner.allocation.registry import ALLOCATORS
from pruner.cli.common import (BadInput, add_common, add_expert_flags, add_param_flags, add_stream_flag, cache_arg,
                               check_chunks, data_dir_arg, declared_params, expert_from_args, params_from_args,
                               perplexity_options_from, phase_bars, print_ppl, queued, stats_spec_from)
from pruner.methods import METHODS
from pruner.model.catalogue import DEVICES
from pruner.model.loading import resolve_device


def cmd_prune(args) -> int:
    import shutil

    from pruner.jobs.workflows import Context, PruneRequest, run
    from pruner.methods import NM
    from pruner.runs.manifest import read_run
    from pruner.specs import PruneSpec
    from pruner.store.files import atomic_dir
    from pruner.store.layout import CacheUnusable, check_writable

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
    check_chunks(args)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"--out {out} exists and is {'a file' if not out.is_dir() else 'not empty'}; choose a new "
                       f"folder")
    if out is not None:  # checked now, not after the prune: a folder under a file, or one that cannot be written
        try:
            check_writable(out, what="--out")
        except CacheUnusable as err:
            raise BadInput(str(err).replace("; choose another with --cache-dir or $PRUNER_CACHE_DIR", "")) from err
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
    stats_spec = stats_spec_from(args)
    a_params, m_params = params_from_args(args, args.allocator, args.method)
    split, split_params = expert_from_args(args)
    # one run per calibration seed: a run group (pruner.runs.groups), summarised with its seed interval
    specs = [PruneSpec(model=stats_spec.model, calib=dataclasses.replace(stats_spec.calib, seed=args.seed + i),
                       allocator=args.allocator, method=args.method, sparsity=sparsity, allocator_params=a_params,
                       method_params=m_params, nm=args.nm, scope=args.scope,
                       leave_unsupported_dense=args.leave_unsupported_dense, expert_split=split,
                       expert_params=split_params) for i in range(args.seeds)]
    requests = [PruneRequest(spec, perplexity=perplexity_options_from(args) if args.ppl else None,
                             data_dir=stats_spec.calib.data_dir, force=args.force, batch_size=args.batch_size,
                             stream=args.stream, tune=args.tune, drop_weights=args.drop_weights)
                for spec in specs]
    if args.background:
        from pruner.jobs.queue import JobStore, default_db, submit

        store = JobStore(default_db(cache_arg(args)))
        for request in requests:
            queued(submit(store, request, cache_dir=cache_arg(args)), request.label())
        return 0
    folders = []
    for spec, request in zip(specs, requests):
        result = run(request, Context(cache_arg(args), progress=phase_bars(), device=str(resolve_device(args.device))))
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
            print_ppl("  pruned", result["details"]["perplexity"])
    if args.seeds > 1 and args.ppl:
        from pruner.runs.groups import group_runs
        from pruner.runs.metrics import perplexity_metric_name

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
    declared = declared_params()
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
    from pruner.jobs.queue import JobStore, default_db
    from pruner.jobs.sweep import SweepRequest, executor_for, wait_for
    from pruner.specs import PruneSpec

    check_chunks(args)
    stats_spec = stats_spec_from(args)
    allocators, methods = args.allocators or ["owl"], args.methods or ["wanda"]
    base = PruneSpec(model=stats_spec.model, calib=stats_spec.calib, allocator=allocators[0], method=methods[0],
                     sparsity=check_sparsity(args.sparsities[0]))
    sweep = SweepRequest(base, allocators=tuple(allocators), methods=tuple(methods),
                         sparsities=tuple(args.sparsities), seeds=args.seeds, params=_grid_axes(args),
                         perplexity=perplexity_options_from(args) if args.ppl else None,
                         data_dir=stats_spec.calib.data_dir, batch_size=args.batch_size, stream=args.stream)
    ray_settings = {"cpus_per_cell": args.cpus_per_cell}
    if args.ray_node_cache:
        ray_settings["node_cache"] = args.ray_node_cache
    if args.ray_shared_cache != "detect":
        ray_settings["shared_cache"] = args.ray_shared_cache == "yes"
    executor = executor_for(args.ray, **ray_settings)
    store = JobStore(default_db(cache_arg(args)))
    ids = executor.submit(store, sweep, cache_arg(args))
    print(f"{sweep.label()}: {len(ids)} job(s) queued on the {executor.name} executor (jobs {ids[0]}–{ids[-1]}; "
          f"follow them with `python -m pruner jobs list`, cancel them all with `python -m pruner jobs cancel "
          f"{ids[0]}-{ids[-1]}`)", flush=True)
    if args.no_wait:
        return 0

    def show(job):
        where = f" [{job.remote['node']} pid {job.remote['pid']}]" if job.remote else ""
        step = f" {job.phase} {job.done}/{job.total}" if job.total else (f" {job.phase}" if job.phase else "")
        print(f"job {job.id} {job.state}{where}:{step} {job.label}", flush=True)

    jobs = wait_for(store, ids, on_change=show, cache_dir=cache_arg(args))
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


def cmd_recover(args) -> int:
    """LoRA-recover a stored run; store it as a new run; print perplexity before and after (same chunks)."""
    from pruner.engine.recover import RecoverSpec
    from pruner.jobs.workflows import Context, RecoverRequest, run
    from pruner.runs.manifest import read_run, run_folder

    run_folder(args.run, cache_arg(args))
    check_chunks(args)
    spec = RecoverSpec(args.run, steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
                       seqlen=args.train_seqlen, batch=args.train_batch)
    request = RecoverRequest(spec, perplexity=None if args.no_ppl else perplexity_options_from(args),
                             data_dir=data_dir_arg(args.data_dir), force=args.force)
    if args.background:
        from pruner.jobs.queue import JobStore, default_db, submit

        return queued(submit(JobStore(default_db(cache_arg(args))), request, cache_dir=cache_arg(args)), request.label())
    result = run(request, Context(cache_arg(args), progress=phase_bars(), device=str(resolve_device(args.device))))
    from pruner.runs.manifest import LORA_SUBFOLDER

    recovered = read_run(run_folder(result["run"], cache_arg(args)))
    rec = recovered.recovery
    print(f"run {recovered.key}: {recovered.label} (parent {args.run})")
    print(f"  folder {run_folder(recovered.key, cache_arg(args))} (adapters in {LORA_SUBFOLDER}/, not merged: the pruned weights "
          f"are unchanged)")
    print(f"  {rec['trainable_params']:,} adapter parameters; training loss {rec['loss_first']:.3f} → "
          f"{rec['loss_last']:.3f} (mean of the first and last tenth of {len(rec['losses'])} steps); {rec['seconds']:.0f} s")
    for name, label in (("perplexity_before", "  before (pruned)"), ("perplexity", "  after LoRA")):
        if name in result["details"]:
            print_ppl(label, result["details"][name])
    return 0


def add_parsers(sub) -> None:
    """Its commands' subparsers."""
    from pruner.methods import SCOPES
    p = sub.add_parser("prune", help="prune a copy of the model with an allocator and a method; store the run")
    add_common(p)
    p.add_argument("--allocator", default="owl", choices=list(ALLOCATORS),
                   help="; ".join(f"{n}: {a.description}" for n, a in ALLOCATORS.items()))
    p.add_argument("--method", default="wanda", choices=list(METHODS),
                   help="; ".join(f"{n}: {m.description}" for n, m in METHODS.items()))
    p.add_argument("--sparsity", type=float, help="target sparsity S in (0, 1) (implied by --nm)")
    add_param_flags(p)
    add_expert_flags(p)
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

    from pruner.engine.recover import (RECOVER_DEFAULT_ALPHA, RECOVER_DEFAULT_BATCH, RECOVER_DEFAULT_LR,
                                       RECOVER_DEFAULT_RANK, RECOVER_DEFAULT_SEQLEN, RECOVER_DEFAULT_STEPS)

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


    p = sub.add_parser("sweep", help="a grid of prunes (allocators × methods × sparsities × parameters × seeds) on "
                                     "the local workers or a Ray cluster; statistics shared by the cells first")
    add_common(p)
    p.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS), help="default: owl")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: wanda")
    p.add_argument("--sparsities", nargs="+", type=float, required=True, help="target sparsities S in (0, 1)")
    p.add_argument("--seeds", type=int, default=1, help="calibration seeds --seed, --seed + 1, … per cell")
    add_param_flags(p)
    p.add_argument("--grid", action="append", metavar="NAME=V1,V2",
                   help="a parameter axis, e.g. --grid lam=0.04,0.08 (repeatable; applies to the cells whose "
                        "allocator or method takes it)")
    add_stream_flag(p)
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

