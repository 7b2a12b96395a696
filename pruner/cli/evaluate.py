"""The `eval` command: perplexity, zero-shot accuracy and CPU speed of a stored run or a dense model."""

from __future__ import annotations

import json

from pruner.cli.common import (BadInput, add_common, cache_arg, check_chunks, data_dir_arg, perplexity_options_from,
                               phase_bars, print_ppl, progress_bar)
from pruner.evaluate.speed_spec import DEFAULT_ROUNDS, MIN_RUNS, SPEED_ENGINES, SpeedSpec
from pruner.evaluate.zeroshot import TASKS, ZEROSHOT_DEFAULT_BATCH
from pruner.model.catalogue import ModelSpec, model_source
from pruner.model.loading import resolve_device


def _print_zeroshot(label: str, r: dict) -> None:
    from pruner.core.intervals import mean_accuracy_stderr
    from pruner.evaluate.zeroshot import TASKS

    part = f" (partial: first {r['limit']} documents per task)" if r["partial"] else ""
    def pm(se):
        return "" if se is None else f" ± {se:.3f}"

    cells = ", ".join(f"{TASKS[t].label} {v['acc']:.3f}{pm(v.get('acc_stderr'))}" for t, v in r["tasks"].items())
    print(f"{label}: zero-shot accuracy{part}: {cells}; mean {r['mean_acc']:.3f}{pm(mean_accuracy_stderr(r['tasks']))}"
          f" over {len(r['tasks'])} tasks (± standard error over the documents; lm-eval {r['lm_eval']})")


def _print_speed(label: str, r: dict) -> None:
    if r["engine"] == "openvino" and not r.get("amx"):
        print(f"{label}: {r['reason']}")
        _print_int8_perplexity(r)
        return
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
    if r["engine"] == "openvino":
        for graph, packed in r["packed"]["pruned"].items():
            print(f"  {graph}: {packed['sparse']} of {packed['fully_connected']} matmul layers packed (sparse weight "
                  f"decompression at rate {r['sparse_rate']:g}); dense graph: {r['packed']['dense'][graph]['sparse']}")
        if r.get("not_attributable"):
            print(f"  {r['not_attributable']}")
        _print_int8_perplexity(r)
    elif not r["deepsparse_available"]:
        print(f"  DeepSparse not used: {r['deepsparse_reason']}")
    if r.get("ideal_decode_speedup_estimate"):
        print(f"  estimate (not a measurement): ideal decode speed-up {r['ideal_decode_speedup_estimate']:.2f}× "
              f"from the weights removed")
    for reason in r["rejected"]:
        print(f"  rejected: {reason}")


def _print_int8_perplexity(r: dict) -> None:
    for name, row in (r.get("perplexity") or {}).items():
        cells = []
        for kind in ("float", "int8"):
            p = row.get(kind)
            if p:
                from pruner.core.intervals import Interval

                part = f", first {p['chunks']} of {p['chunks_total']} chunks" if p.get("partial") else ""
                cells.append(f"{'8-bit' if kind == 'int8' else 'float'} {Interval.from_dict(p['interval']).text()}"
                             f"{part}")
        print(f"  {name} perplexity: " + "; ".join(cells))


def _speed_spec(args):
    from pruner.evaluate.speed_spec import SpeedSpec

    return SpeedSpec(batch=args.speed_batch, seqlen=args.speed_seqlen, threads=args.threads, runs=args.runs,
                     rounds=args.rounds)


def cmd_eval(args) -> int:
    from pruner.runs import metrics

    if not (args.ppl or args.zeroshot or args.speed):
        raise BadInput("nothing to evaluate: pass --ppl (WikiText-2 perplexity), --zeroshot (lm-eval accuracy) "
                       "and/or --speed (DeepSparse CPU speed-up, needs --run)")
    check_chunks(args)
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
    # OpenVINO's 8-bit step is calibrated on the C4 text of the data folder
    data_dir = data_dir_arg(args.data_dir) if (args.ppl or args.zeroshot or args.engine == "openvino") else None
    source = "hub" if (args.zeroshot and data_dir is None) else "local"
    device = str(resolve_device(args.device))
    results = {}
    if args.run:
        from pruner.jobs.workflows import Context, EvalRequest, ZeroshotOptions, run
        from pruner.runs.manifest import run_folder

        run_folder(args.run, cache_arg(args))  # a key that is no key, or no such run: one line, before any work
        request = EvalRequest(args.run, perplexity=perplexity_options_from(args) if args.ppl else None,
                              zeroshot=ZeroshotOptions(tuple(tasks) if tasks else None, args.limit, source,
                                                       args.zeroshot_batch)
                              if args.zeroshot else None, speed=speed_spec, engine=args.engine, data_dir=data_dir)
        results = run(request, Context(cache_arg(args), progress=phase_bars(), device=device))["details"]
        for name, show in (("perplexity", print_ppl), ("zeroshot", _print_zeroshot), ("speed", _print_speed)):
            if name in results:
                show(f"run {args.run}", results[name])
    else:
        model = ModelSpec(name=args.model, dtype=args.dtype, device=args.device,
                          trust_remote_code=args.trust_remote_code)
        model_source(model)
        if args.ppl:
            from pruner.model.loading import load_model

            loaded = load_model(model, cache_arg(args), stream=True) if args.stream else None
            results["perplexity"] = metrics.dense_perplexity(model, data_dir, cache_arg(args), max_chunks=args.max_chunks,
                                                             seqlen=args.seqlen_eval, loaded=loaded,
                                                             progress=progress_bar("perplexity"))
            print_ppl(f"dense {args.model}", results["perplexity"])
        if args.zeroshot:
            results["zeroshot"] = metrics.dense_zeroshot(model, data_dir, cache_arg(args), tasks=tasks, limit=args.limit,
                                                         source=source, batch_size=args.zeroshot_batch,
                                                         progress=progress_bar("zero-shot tasks"))
            _print_zeroshot(f"dense {args.model}", results["zeroshot"])
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def add_parsers(sub) -> None:
    """Its commands' subparsers."""
    p = sub.add_parser("eval", help="evaluate a stored run (--run KEY) or a dense model (--model)")
    add_common(p)
    p.add_argument("--run", help="run key printed by `prune`")
    p.add_argument("--ppl", action="store_true", help="WikiText-2 test perplexity")
    p.add_argument("--stream", action="store_true",
                   help="perplexity block by block over all chunks, each block read from the run's shards for its "
                        "turn (memory: one block and the chunks' hidden states; same numbers)")
    p.add_argument("--max-chunks", type=int, help="first N chunks only (a partial estimate)")
    p.add_argument("--eval-seqlen", dest="seqlen_eval", type=int, help="evaluation window (default min(2048, context))")

    g = p.add_argument_group("zero-shot accuracy (lm-eval)")
    g.add_argument("--zeroshot", action="store_true", help="zero-shot accuracy with lm-evaluation-harness")
    g.add_argument("--tasks", help=f"comma-separated subset of: {', '.join(TASKS)} (default: all seven)")
    g.add_argument("--limit", type=int, help="first N documents per task only (a partial result, labelled so)")
    g.add_argument("--zeroshot-batch", type=int, default=ZEROSHOT_DEFAULT_BATCH,
                   help="lm-eval batch size (memory: the longest batch holds batch × tokens × vocabulary logits)")
    g = p.add_argument_group("CPU speed (ONNX export, DeepSparse or OpenVINO)")
    g.add_argument("--speed", action="store_true", help="time dense vs pruned (needs --run)")
    g.add_argument("--engine", default="auto", choices=SPEED_ENGINES,
                   help="auto: DeepSparse if it can run here, else dense ONNX Runtime timings + an estimate; "
                        "openvino: 8-bit (w8a8) dense vs 8-bit sparse with OpenVINO's sparse weight decompression "
                        "(needs a CPU with AMX; with --ppl also the 8-bit models' perplexity)")
    g.add_argument("--speed-batch", type=int, default=SpeedSpec.batch, help="batch size B of both graphs")
    g.add_argument("--speed-seqlen", type=int, default=SpeedSpec.seqlen,
                   help="T: prefill length and decode KV-cache length")
    g.add_argument("--threads", type=int, help="CPU threads (default: all)")
    g.add_argument("--runs", type=int, default=MIN_RUNS, help=f"timed calls per graph (≥ {MIN_RUNS}; median)")
    g.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                   help="dense and pruned take turns in this many rounds of the timed calls (1 ≤ rounds ≤ runs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
