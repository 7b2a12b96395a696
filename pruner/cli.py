"""``python -m pruner ...``: builds specs from argv and calls the same functions the dashboard calls.

Bad input ends with a one-line ``error: ...`` on stderr naming the allowed values, exit code 2, and nothing cached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from pruner.allocation import ALLOCATORS, BESA_DEFAULT_BETA, OWL_DEFAULT_LAMBDA, OWL_DEFAULT_M, check_sparsity
from pruner.data import DataError
from pruner.specs import CALIB_PRESETS, DEFAULT_CALIB_PRESET, DTYPES, DEVICES, CalibSpec, ModelSpec, StatsSpec
from pruner.models import resolve_device
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
    g.add_argument("--cache-dir", help="cache folder (default: <project>/cache)")
    g.add_argument("--batch-size", type=int, default=4, help="calibration mini-batch size (memory vs speed)")


def _stats_spec(args) -> StatsSpec:
    model = ModelSpec(name=args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    from pruner.models import model_source

    model_source(model)  # unknown names fail here, before anything is loaded
    overrides = {k: v for k, v in (("nsamples", args.nsamples), ("seqlen", args.seqlen)) if v is not None}
    calib = CalibSpec.preset(args.preset, seed=args.seed, data_dir=_data_dir(args.data_dir), **overrides)
    if args.batch_size < 1:
        raise BadInput(f"--batch-size must be ≥ 1; got {args.batch_size}")
    return StatsSpec(model=model, calib=calib)


def _check_m(m: float) -> float:
    if not (M_GRID[0] <= m <= M_GRID[-1]):
        raise BadInput(f"M must be in [{M_GRID[0]:g}, {M_GRID[-1]:.0f}]; got {m:g}")
    return m


def _progress_bar(label: str):
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done: int, total: int):
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=label, unit="block", file=sys.stderr)
        bar["bar"].update(done - bar["bar"].n)
        if done == total:
            bar["bar"].close()

    return update


def _cache(args) -> Path | None:
    return Path(args.cache_dir) if args.cache_dir else None


def cmd_stats(args) -> int:
    from pruner.api import get_stats

    ms = [_check_m(m) for m in (args.m or DEFAULT_TABLE_M)]
    spec = _stats_spec(args)
    stats = get_stats(spec, _cache(args), progress=_progress_bar("outlier statistics"), batch_size=args.batch_size)
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
    from pruner.api import allocation_for

    try:
        S = check_sparsity(args.sparsity)
    except ValueError as err:
        raise BadInput(str(err)) from err
    if args.lam < 0:
        raise BadInput(f"λ (--lam) must be ≥ 0; got {args.lam:g}")
    _check_m(args.m)
    spec = _stats_spec(args)
    if ALLOCATORS[args.allocator].learned:
        return _allocate_besa(args, spec, S)
    stats, alloc = allocation_for(spec, args.allocator, S, lam=args.lam, m=args.m, cache_dir=_cache(args),
                                  progress=_progress_bar("outlier statistics"), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(alloc.to_dict(stats.layer_names, stats.layer_block), indent=2))
        return 0
    params = ", ".join(f"{k}={v:g}" for k, v in alloc.params.items())
    print(f"{ALLOCATORS[args.allocator].label} allocation, S={S:g}{', ' + params if params else ''}: "
          f"overall {alloc.overall:.6f}")
    print("block  sparsity")
    for i, s in enumerate(alloc.block_sparsity):
        print(f"{i:5d}  {s:.4f}")
    return 0


def _check_beta(beta: float | None) -> float | None:
    from pruner.allocation import check_beta

    try:
        return None if beta is None else check_beta(beta)
    except ValueError as err:
        raise BadInput(f"{err} (--beta)") from err


def _allocate_besa(args, spec, S: float) -> int:
    """Learn (or load) BESA's per-layer sparsities and print them per block with what the learning achieved."""
    from pruner import api
    from pruner.allocation import allocate

    beta = _check_beta(args.beta)
    # missing statistics are collected in the learning pass itself (no separate pass), then read from the cache
    result = api.besa_allocation(spec, S, beta, _cache(args), progress=_progress_bar("learning BESA sparsities"),
                                 batch_size=args.batch_size)
    stats = api.get_stats(spec, _cache(args), progress=_progress_bar("outlier statistics"), batch_size=args.batch_size)
    alloc = allocate("besa", stats, S, beta=result["beta"], learned=api.besa_layer_sparsity(result, stats))
    if args.json:
        print(json.dumps({**alloc.to_dict(stats.layer_names, stats.layer_block), "learning": result}, indent=2))
        return 0
    print(f"BESA allocation, S={S:g}, β={result['beta']:g} ({result['epochs']} epochs, {result['steps_per_block']} steps "
          f"per block, learned in {result['seconds']:.0f} s): overall {alloc.overall:.6f}")
    print("E: the block's squared error ÷ its own contribution ‖Y − X‖², with hard Wanda masks")
    names = [n for n, b in zip(stats.layer_names, stats.layer_block) if b == 0]
    print("block  learned  shift   E BESA  E uniform  " + "  ".join(f"{n.split('.')[-1]:>9}" for n in names))
    for i in range(stats.n_blocks):
        layer = alloc.layer_sparsity[np.asarray(stats.layer_block) == i]
        print(f"{i:5d}  {result['learned_mean'][i]:.4f}  {result['shift'][i]:+.4f}  {result['error_hard'][i]:.4f}  "
              f"{result['error_uniform'][i]:9.4f}  " + "  ".join(f"{v:9.4f}" for v in layer))
    return 0


def _phase_bars():
    bars = {}

    def update(phase: str, done: int, total: int):
        if phase not in bars:
            bars[phase] = _progress_bar(phase)
        bars[phase](done, total)

    return update


def _print_ppl(label: str, r: dict) -> None:
    part = f" (partial: first {r['chunks']} of {r['chunks_total']} chunks)" if r["partial"] else ""
    print(f"{label}: WikiText-2 test perplexity {r['perplexity']:.3f} at seqlen {r['seqlen']}{part}; "
          f"{r['tokens_per_second']:.0f} tokens/s")


def _check_chunks(args) -> None:
    if args.max_chunks is not None and args.max_chunks < 1:
        raise BadInput(f"--max-chunks must be ≥ 1; got {args.max_chunks}")
    if getattr(args, "seqlen_eval", None) is not None and args.seqlen_eval < 2:
        raise BadInput(f"--eval-seqlen must be ≥ 2; got {args.seqlen_eval}")


def cmd_prune(args) -> int:
    import shutil

    from pruner import api
    from pruner.methods import NM
    from pruner.specs import PruneSpec
    from pruner.store import atomic_dir, read_manifest

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
    stats_spec = _stats_spec(args)
    spec = PruneSpec(model=stats_spec.model, calib=stats_spec.calib, allocator=args.allocator, method=args.method,
                     sparsity=sparsity, lam=args.lam, m=args.m, nm=args.nm, scope=args.scope,
                     beta=_check_beta(args.beta))
    if spec.m is not None:
        _check_m(spec.m)
    if args.background:
        from pruner.jobs import JobStore, default_db, submit
        from pruner.specs import spec_to_dict

        store = JobStore(default_db(_cache(args)))
        payload = {"spec": spec_to_dict(spec), "ppl": args.ppl, "max_chunks": args.max_chunks,
                   "data_dir": stats_spec.calib.data_dir}
        job = submit(store, "prune", payload, cache_dir=_cache(args))
        print(f"job {job} queued: {spec.label()} (follow it with `python -m pruner jobs list`)")
        return 0
    folder = api.run_prune(spec, _cache(args), progress=_phase_bars(), force=args.force, batch_size=args.batch_size)
    manifest = read_manifest(folder)
    print(f"run {spec.key()}: {spec.label()}")
    print(f"  folder {folder}")
    print(f"  achieved sparsity {manifest['achieved']['overall']:.6f} (target {sparsity:g}); "
          f"prune {manifest['timings_s']['prune']:.1f} s")
    if args.ppl:
        result = api.evaluate_perplexity(folder, stats_spec.calib.data_dir, max_chunks=args.max_chunks,
                                         device=str(resolve_device(args.device)),
                                         progress=_progress_bar("perplexity"))
        _print_ppl("  pruned", result)
    if out is not None:
        if out.exists():
            out.rmdir()
        with atomic_dir(out) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        print(f"  copied to {out}")
    return 0


def _print_zeroshot(label: str, r: dict) -> None:
    from pruner.evaluate.zeroshot import TASKS

    part = f" (partial: first {r['limit']} documents per task)" if r["partial"] else ""
    cells = ", ".join(f"{TASKS[t].label} {v['acc']:.3f}" for t, v in r["tasks"].items())
    print(f"{label}: zero-shot accuracy{part}: {cells}; mean {r['mean_acc']:.3f} over {len(r['tasks'])} tasks "
          f"(lm-eval {r['lm_eval']})")


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
    from pruner import api
    from pruner.store import run_dir, run_exists

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
    data_dir = _data_dir(args.data_dir) if (args.ppl or args.zeroshot) else None
    source = "hub" if (args.zeroshot and data_dir is None) else "local"
    device = str(resolve_device(args.device))
    results = {}
    if args.run:
        if not run_exists(args.run, _cache(args)):
            raise BadInput(f"no run {args.run!r} in {run_dir(args.run, _cache(args)).parent}; "
                           f"`python -m pruner prune ...` prints run keys")
        folder = run_dir(args.run, _cache(args))
        if args.ppl:
            results["perplexity"] = api.evaluate_perplexity(folder, data_dir, max_chunks=args.max_chunks,
                                                            seqlen=args.seqlen_eval, device=device,
                                                            progress=_progress_bar("perplexity"))
            _print_ppl(f"run {args.run}", results["perplexity"])
        if args.zeroshot:
            results["zeroshot"] = api.evaluate_zeroshot(folder, data_dir, tasks=tasks, limit=args.limit,
                                                        source=source, device=device,
                                                        progress=_progress_bar("zero-shot tasks"))
            _print_zeroshot(f"run {args.run}", results["zeroshot"])
        if args.speed:
            results["speed"] = api.evaluate_speed(folder, speed_spec, _cache(args), engine=args.engine,
                                                  progress=_phase_bars())
            _print_speed(f"run {args.run}", results["speed"])
    else:
        model = ModelSpec(name=args.model, dtype=args.dtype, device=args.device,
                          trust_remote_code=args.trust_remote_code)
        from pruner.models import model_source

        model_source(model)
        if args.ppl:
            results["perplexity"] = api.dense_perplexity(model, data_dir, _cache(args), max_chunks=args.max_chunks,
                                                         seqlen=args.seqlen_eval,
                                                         progress=_progress_bar("perplexity"))
            _print_ppl(f"dense {args.model}", results["perplexity"])
        if args.zeroshot:
            results["zeroshot"] = api.dense_zeroshot(model, data_dir, _cache(args), tasks=tasks, limit=args.limit,
                                                     source=source, progress=_progress_bar("zero-shot tasks"))
            _print_zeroshot(f"dense {args.model}", results["zeroshot"])
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_recover(args) -> int:
    """LoRA-recover a stored run; store it as a new run; print perplexity before and after (same chunks)."""
    from pruner import api
    from pruner.recover import RecoverSpec
    from pruner.store import run_dir, run_exists

    if not run_exists(args.run, _cache(args)):
        raise BadInput(f"no run {args.run!r} in {run_dir(args.run, _cache(args)).parent}; "
                       f"`python -m pruner prune ...` prints run keys")
    _check_chunks(args)
    spec = RecoverSpec(args.run, steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
                       seqlen=args.train_seqlen, batch=args.train_batch)
    data_dir = _data_dir(args.data_dir)
    if args.background:
        from dataclasses import asdict

        from pruner.jobs import JobStore, default_db, submit

        job = submit(JobStore(default_db(_cache(args))), "recover",
                     {"recover": asdict(spec), "ppl": not args.no_ppl, "max_chunks": args.max_chunks,
                      "data_dir": data_dir}, cache_dir=_cache(args))
        print(f"job {job} queued: {spec.label()} of run {args.run} (follow it with `python -m pruner jobs list`)")
        return 0
    device = str(resolve_device(args.device))
    parent = run_dir(args.run, _cache(args))
    folder = api.recover_run(parent, spec, data_dir, _cache(args), device=device, progress=_phase_bars(),
                             force=args.force)
    from pruner.store import read_manifest

    m = read_manifest(folder)
    rec = m["recovery"]
    print(f"run {m['key']}: {m['label']} (parent {args.run})")
    print(f"  folder {folder} (adapters in {api.LORA_SUBFOLDER}/, not merged: the pruned weights are unchanged)")
    print(f"  {rec['trainable_params']:,} adapter parameters; training loss {rec['loss_first']:.3f} → "
          f"{rec['loss_last']:.3f} (mean of the first and last tenth of {len(rec['losses'])} steps); {rec['seconds']:.0f} s")
    if not args.no_ppl:
        for label, f in (("  before (pruned)", parent), ("  after LoRA", folder)):
            r = api.evaluate_perplexity(f, data_dir, max_chunks=args.max_chunks, device=device,
                                        progress=_progress_bar("perplexity"))
            _print_ppl(label, r)
    return 0


def cmd_deepsparse_env(args) -> int:
    from pruner.evaluate.speed import deepsparse_status, ensure_deepsparse_env

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
        print(f"{j.id:>4}  {j.state:<9} {prog:<22} {elapsed:>8}  {j.label}")
        if j.error and j.state == "failed":
            print(f"      error: {j.error.splitlines()[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pruner", description="Layerwise sparsity allocation for LLM pruning")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("stats", help="outlier statistics of the dense model; prints the per-block LOD")
    _add_common(p)
    p.add_argument("--m", type=float, action="append", help=f"outlier threshold M (repeatable; default {DEFAULT_TABLE_M})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("allocate", help="per-block and per-layer sparsities from cached statistics")
    _add_common(p)
    p.add_argument("--allocator", default="owl", choices=list(ALLOCATORS))
    p.add_argument("--sparsity", type=float, required=True, help="target sparsity S in (0, 1)")
    p.add_argument("--lam", type=float, default=OWL_DEFAULT_LAMBDA, help="OWL's λ (max deviation from S)")
    p.add_argument("--m", type=float, default=OWL_DEFAULT_M, help="OWL's outlier threshold M")
    p.add_argument("--beta", type=float, help=f"BESA's sparsity-penalty weight β (default {BESA_DEFAULT_BETA:g})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_allocate)

    from pruner.methods import METHODS, SCOPES

    p = sub.add_parser("prune", help="prune a copy of the model with an allocator and a method; store the run")
    _add_common(p)
    p.add_argument("--allocator", default="owl", choices=list(ALLOCATORS))
    p.add_argument("--method", default="wanda", choices=list(METHODS))
    p.add_argument("--sparsity", type=float, help="target sparsity S in (0, 1) (implied by --nm)")
    p.add_argument("--lam", type=float, help=f"OWL's λ (default {OWL_DEFAULT_LAMBDA})")
    p.add_argument("--m", type=float, help=f"OWL's outlier threshold M (default {OWL_DEFAULT_M:g})")
    p.add_argument("--beta", type=float, help=f"BESA's sparsity-penalty weight β (default {BESA_DEFAULT_BETA:g})")
    p.add_argument("--nm", help="N:M semi-structured sparsity, e.g. 2:4 (N kept of every M)")
    p.add_argument("--scope", choices=list(SCOPES), help="comparison group (default: the method's own)")
    p.add_argument("--out", help="also copy the pruned Hugging Face folder here")
    p.add_argument("--force", action="store_true", help="recompute even if this run exists")
    p.add_argument("--ppl", action="store_true", help="evaluate WikiText-2 perplexity afterwards")
    p.add_argument("--max-chunks", type=int, help="perplexity on the first N chunks only (a partial estimate)")
    p.add_argument("--background", action="store_true", help="queue it as a background job and return at once")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="evaluate a stored run (--run KEY) or a dense model (--model)")
    _add_common(p)
    p.add_argument("--run", help="run key printed by `prune`")
    p.add_argument("--ppl", action="store_true", help="WikiText-2 test perplexity")
    p.add_argument("--max-chunks", type=int, help="first N chunks only (a partial estimate)")
    p.add_argument("--eval-seqlen", dest="seqlen_eval", type=int, help="evaluation window (default min(2048, context))")
    from pruner.evaluate.speed import DEFAULT_ROUNDS, MIN_RUNS, SpeedSpec
    from pruner.evaluate.zeroshot import TASKS

    g = p.add_argument_group("zero-shot accuracy (lm-eval)")
    g.add_argument("--zeroshot", action="store_true", help="zero-shot accuracy with lm-evaluation-harness")
    g.add_argument("--tasks", help=f"comma-separated subset of: {', '.join(TASKS)} (default: all seven)")
    g.add_argument("--limit", type=int, help="first N documents per task only (a partial result, labelled so)")
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
    p.add_argument("--cache-dir", help="cache folder (default: <project>/cache)")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("deepsparse-env", help="create the DeepSparse virtual environment (.venv-deepsparse)")
    p.add_argument("--check", action="store_true", help="only say whether DeepSparse can run (exit 1 if not)")
    p.set_defaults(func=cmd_deepsparse_env)

    p = sub.add_parser("jobs", help="the background job table: list, wait for or cancel jobs")
    p.add_argument("action", choices=["list", "cancel", "wait", "worker"])
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir", help="cache folder (default: <project>/cache)")
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BadInput, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
