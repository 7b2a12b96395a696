"""What every command shares: the one-line-error parser, the common flags (model, calibration, cache, data, parameters of
the registries, experts), specs built from them, progress bars and the printers of results."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pruner.allocation.registry import ALLOCATORS
from pruner.core.params import Param
from pruner.engine.stats import M_GRID
from pruner.methods import METHODS
from pruner.model.catalogue import DEVICES, DTYPES, ModelSpec, check_calibration_fits, model_source
from pruner.specs import CALIB_PRESETS, DEFAULT_CALIB_PRESET, CalibSpec, StatsSpec
from pruner.store.files import default_data_dir

EXIT_BAD_INPUT = 2


HUB = "hub"


class BadInput(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the allowed values are in argparse's message)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message}\n")


def data_dir_arg(arg: str | None) -> str | None:
    """--data-dir, else $PRUNER_DATA_DIR, else ../shared/data; 'hub' means load from the Hugging Face hub."""
    value = arg or os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
    if value == HUB:
        return None
    if not Path(value).is_dir():
        raise BadInput(f"data directory {value} does not exist; pass --data-dir DIR (laid out like ../shared/data) "
                       f"or --data-dir hub")
    return value


def add_common(p: argparse.ArgumentParser) -> None:
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


def add_stream_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", action="store_true",
                   help="read one decoder block at a time from the checkpoint: memory holds one block, not the "
                        "model (the same results)")


def model_spec_from(args) -> ModelSpec:
    model = ModelSpec(name=args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                      offload_activations=args.offload_activations)
    model_source(model)  # unknown names and folders that are not models fail here, before anything is loaded
    return model


def stats_spec_from(args) -> StatsSpec:
    model = model_spec_from(args)
    overrides = {k: v for k, v in (("nsamples", args.nsamples), ("seqlen", args.seqlen)) if v is not None}
    calib = CalibSpec.preset(args.preset, seed=args.seed, data_dir=data_dir_arg(args.data_dir), **overrides)
    check_calibration_fits(model, calib.seqlen)  # before minutes of work, not after
    if args.batch_size < 1:
        raise BadInput(f"--batch-size must be ≥ 1; got {args.batch_size}")
    return StatsSpec(model=model, calib=calib)


def declared_params() -> dict[str, tuple[Param, list[str]]]:
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


def add_param_flags(p: argparse.ArgumentParser, allocators: bool = True, methods: bool = True) -> None:
    g = p.add_argument_group("allocator and method parameters (each applies only to the entries named)")
    for name, (param, owners) in declared_params().items():
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


def add_expert_flags(p: argparse.ArgumentParser) -> None:
    from pruner.allocation import EXPERT_PARAMS, EXPERT_SPLITS

    g = p.add_argument_group("mixture-of-experts models: how a block's sparsity is shared among its routed experts")
    g.add_argument("--expert-split", default="uniform", choices=list(EXPERT_SPLITS),
                   help="; ".join(f"{n}: {text}" for n, text in EXPERT_SPLITS.items()))
    for param in EXPERT_PARAMS:
        g.add_argument(f"--{param.name.replace('_', '-')}", dest=param.name, type=param.kind, default=None,
                       metavar=param.symbol, help=f"{param.symbol}: {param.help}; {param.range_text()}, default "
                                                  f"{param.default:g} (with --expert-split outliers or routing)")


def expert_from_args(args) -> tuple[str, dict]:
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


def params_from_args(args, allocator: str | None, method: str | None) -> tuple[dict, dict]:
    """(allocator parameters, method parameters) from the flags; a flag that neither takes is an error."""
    a_params = ALLOCATORS[allocator].params if allocator else ()
    m_params = METHODS[method].params if method else ()
    given = {name: getattr(args, name) for name in declared_params() if getattr(args, name, None) is not None}
    stray = [n for n in given if n not in {p.name for p in a_params + m_params}]
    if stray:
        takes = [f"allocator {allocator} takes {', '.join(f'--{p.name}' for p in a_params) or 'no parameters'}"]
        if method:
            takes.append(f"method {method} takes {', '.join(f'--{p.name}' for p in m_params) or 'no parameters'}")
        raise BadInput(f"{', '.join('--' + n for n in stray)} does not apply here: {'; '.join(takes)}")
    return ({p.name: given[p.name] for p in a_params if p.name in given},
            {p.name: given[p.name] for p in m_params if p.name in given})


def check_m(m: float) -> float:
    if not (M_GRID[0] <= m <= M_GRID[-1]):
        raise BadInput(f"M must be in [{M_GRID[0]:g}, {M_GRID[-1]:.0f}]; got {m:g}")
    return m


def progress_bar(label: str, unit: str = "block"):
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done: int, total: int):
        if bar["bar"] is None or bar["bar"].total != total:  # a new count (e.g. the search's table, then its generations)
            bar["bar"] = tqdm(total=total, desc=label, unit=unit, file=sys.stderr)
        bar["bar"].update(done - bar["bar"].n)
        if done == total:
            bar["bar"].close()

    return update


def cache_arg(args) -> Path | None:
    """--cache-dir, else $PRUNER_CACHE_DIR (as the dashboard reads it), else None: the project's cache/."""
    value = getattr(args, "cache_dir", None) or os.environ.get("PRUNER_CACHE_DIR")
    return Path(value) if value else None


def phase_bars():
    """A workflow ``Context.progress`` that draws one tqdm bar per phase on stderr (calibration, learning, pruning,
    evaluation), each opened when its phase has done its first step; a one-step status ("waiting for the same prune
    in another process") shows at once. (A phase's 0-of-n start report is for the job table's ETA clock: a bar opened
    then would be redrawn after an interruption's last line.)"""
    bars = {}

    def update(phase: str, done: int, total: int):
        if done == 0 and total > 1 and phase not in bars:
            return
        if phase not in bars:
            bars[phase] = progress_bar(phase, PHASE_UNITS.get(phase, "block"))
        bars[phase](done, total)

    return update


def print_ppl(label: str, r: dict) -> None:
    """One perplexity with its evaluation interval (over chunks) and whether the evaluation was partial."""
    part = f" (partial: first {r['chunks']} of {r['chunks_total']} chunks)" if r["partial"] else ""
    ci = r.get("interval") or {}
    interval = (f" [{ci['low']:.3f}, {ci['high']:.3f}] ({ci['confidence']:.0%} evaluation interval over "
                f"{ci['n']} chunks)" if ci.get("low") is not None else " (one chunk: no evaluation interval)"
                if ci else "")
    source = f"; taken from the stored {r['derived_from']}" if r.get("derived_from") else ""
    print(f"{label}: WikiText-2 test perplexity {r['perplexity']:.3f}{interval} at seqlen {r['seqlen']}{part}; "
          f"{r['tokens_per_second']:.0f} tokens/s{source}")


def check_chunks(args) -> None:
    if args.max_chunks is not None and args.max_chunks < 1:
        raise BadInput(f"--max-chunks must be ≥ 1; got {args.max_chunks}")
    if getattr(args, "seqlen_eval", None) is not None and args.seqlen_eval < 2:
        raise BadInput(f"--eval-seqlen must be ≥ 2; got {args.seqlen_eval}")


def perplexity_options_from(args):
    from pruner.jobs.workflows import PerplexityOptions

    return PerplexityOptions(max_chunks=args.max_chunks, seqlen=getattr(args, "seqlen_eval", None),
                             stream=getattr(args, "stream", False))


def queued(job: int, what: str) -> int:
    print(f"job {job} queued: {what} (follow it with `python -m pruner jobs list`)")
    return 0


#: What a workflow phase counts, where it is not transformer blocks (the phase names of ``pruner.jobs.workflows``).
PHASE_UNITS = {"perplexity": "chunk", "zero-shot tasks": "task", "dense zero-shot tasks": "task",
               "damage table": "step", "LoRA steps": "step"}
