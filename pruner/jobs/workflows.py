"""Typed requests and the one workflow per request type, shared by the CLI, the job worker and the pages.

A request is a frozen dataclass that validates itself when built and round-trips through ``to_dict`` /
``request_from_dict`` (the job table stores it so). ``run(request, context)`` dispatches by type through
``WORKFLOWS``: the CLI runs a request in-process with progress bars, the worker runs the same request from the job
table, and the pages only build requests and submit them. Adding a kind of work is one request class and one
workflow function registered here.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from pruner.allocation import ALLOCATORS, check_sparsity
from pruner.core.memory import reset_peak_rss
from pruner.core.params import params_text
from pruner.engine.artifacts import get_stats, learn_allocation, learned_key
from pruner.engine.calibrate import Cancelled
from pruner.engine.recover import RecoverSpec
from pruner.evaluate.speed_spec import SPEED_ENGINES, SpeedSpec
from pruner.evaluate.zeroshot import ZEROSHOT_DEFAULT_BATCH, parse_tasks
from pruner.model.catalogue import ModelSpec, check_calibration_fits
from pruner.runs import metrics
from pruner.runs.execute import PhaseProgress, recover_run, run_prune as prune_to_run
from pruner.runs.manifest import read_run, run_folder
from pruner.specs import PruneSpec, StatsSpec, spec_from_dict, spec_to_dict
from pruner.store.layout import check_key


@dataclass
class Context:
    """Where a workflow runs: the cache, how it reports progress and learns it should stop, and the device used
    to evaluate stored runs."""

    cache_dir: Path | None = None
    progress: PhaseProgress | None = None
    should_cancel: Callable[[], bool] | None = None
    device: str = "cpu"

    def phase(self, name: str):
        """A (done, total) callback for one named phase, or None."""
        return (lambda done, total: self.progress(name, done, total)) if self.progress else None

    def check_cancel(self, before: str) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"cancelled before {before}")


# ---------------------------------------------------------------------------------------------------------------
# Options shared by several requests


@dataclass(frozen=True)
class PerplexityOptions:
    """WikiText-2 test perplexity: ``max_chunks`` None is the full test set; k is a partial estimate on the first
    k chunks (labelled so everywhere). ``seqlen``: the evaluation window (None: min(2048, the model's context))."""

    max_chunks: int | None = None
    seqlen: int | None = None
    #: block by block over all chunks, each block read from disk for its turn (same numbers; memory: one block)
    stream: bool = False

    def __post_init__(self):
        if self.max_chunks is not None and not (isinstance(self.max_chunks, int) and self.max_chunks >= 1):
            raise ValueError(f"max_chunks must be an integer ≥ 1 (or none: all chunks); got {self.max_chunks!r}")
        if self.seqlen is not None and not (isinstance(self.seqlen, int) and self.seqlen >= 2):
            raise ValueError(f"the evaluation seqlen must be an integer ≥ 2; got {self.seqlen!r}")

    def label(self) -> str:
        return "perplexity" + (f" (first {self.max_chunks} chunks)" if self.max_chunks else "")


@dataclass(frozen=True)
class ZeroshotOptions:
    """lm-eval zero-shot accuracy: ``tasks`` None is all seven; ``limit`` k: the first k documents per task;
    ``batch_size``: lm-eval's batch (memory: its longest batch holds batch × tokens × vocabulary logits)."""

    tasks: tuple[str, ...] | None = None
    limit: int | None = None
    source: str = "local"
    batch_size: int = ZEROSHOT_DEFAULT_BATCH

    def __post_init__(self):
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(parse_tasks(list(self.tasks))))
        if self.limit is not None and not (isinstance(self.limit, int) and self.limit >= 1):
            raise ValueError(f"limit must be an integer ≥ 1 (documents per task) or none; got {self.limit!r}")
        if self.source not in ("local", "hub"):
            raise ValueError(f"zero-shot source must be 'local' or 'hub'; got {self.source!r}")
        _check_batch(self.batch_size)

    def label(self) -> str:
        return "zero-shot accuracy" + (f" (first {self.limit} per task)" if self.limit else "")


# ---------------------------------------------------------------------------------------------------------------
# Requests


class Request(ABC):
    """Base of the typed requests: ``kind`` names it in the job table; nested specs are decoded by ``_decoders``."""

    kind: ClassVar[str]
    _decoders: ClassVar[dict[str, Callable]] = {}

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (StatsSpec, PruneSpec)):
                value = spec_to_dict(value)
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, payload: dict) -> "Request":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(payload) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
        try:
            values = {k: (cls._decoders[k](v) if k in cls._decoders and v is not None else v)
                      for k, v in payload.items()}
            return cls(**values)
        except TypeError as err:  # a payload of another shape (e.g. written by an older version)
            raise ValueError(f"{cls.__name__}: unreadable payload ({err})") from err

    @abstractmethod
    def label(self) -> str:
        """What the job list shows."""

    def makes(self) -> frozenset[str]:
        """Names of the cached results this job writes that later jobs read (``needs``): cancelled before it writes
        them, it takes those jobs along (``JobStore.cancel``), else the first would start the same work itself."""
        return frozenset()

    def needs(self) -> frozenset[str]:
        """Names of the cached results this job reads that an earlier job of the same sweep writes (``makes``)."""
        return frozenset()


def _result(spec: StatsSpec, allocator: str | None = None, sparsity: float = 0.0, params: dict | None = None) -> str:
    """A cached result's name in ``makes``/``needs``: a calibration set's statistics, or a learned allocation's."""
    return f"learned {learned_key(spec, allocator, sparsity, params)}" if allocator else f"stats {spec.key()}"


def _perplexity_options(d: dict) -> PerplexityOptions:
    return PerplexityOptions(**d)


def _check_fits(spec: StatsSpec) -> None:
    """Calibration windows no longer than the model's context (read without loading the weights)."""
    check_calibration_fits(spec.model, spec.calib.seqlen)


def _check_batch(batch_size) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch size must be an integer ≥ 1; got {batch_size!r}")


@dataclass(frozen=True)
class StatsRequest(Request):
    """The dense model's outlier statistics on a calibration set (cached)."""

    kind: ClassVar[str] = "stats"
    _decoders: ClassVar[dict] = {"spec": spec_from_dict}
    spec: StatsSpec
    batch_size: int = 4
    #: read one block at a time from the checkpoint (``pruner.model.streaming``)
    stream: bool = False

    def __post_init__(self):
        _check_fits(self.spec)
        _check_batch(self.batch_size)

    def label(self) -> str:
        return f"statistics of {self.spec.model.name} on {self.spec.calib.nsamples}×{self.spec.calib.seqlen} tokens"

    def makes(self) -> frozenset[str]:
        return frozenset({_result(self.spec)})


@dataclass(frozen=True)
class LearnRequest(Request):
    """A learned allocator's per-layer sparsities (BESA) at S with its parameters (cached)."""

    kind: ClassVar[str] = "learn"
    _decoders: ClassVar[dict] = {"spec": spec_from_dict}
    spec: StatsSpec
    allocator: str
    sparsity: float
    params: dict = field(default_factory=dict)
    batch_size: int = 4
    #: read one block at a time from the checkpoint (``pruner.model.streaming``)
    stream: bool = False

    def __post_init__(self):
        if self.allocator not in ALLOCATORS or not ALLOCATORS[self.allocator].learned:
            learned = [n for n, a in ALLOCATORS.items() if a.learned]
            raise ValueError(f"a learn request needs a learned allocator ({', '.join(learned)}); got {self.allocator!r}")
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        object.__setattr__(self, "params", ALLOCATORS[self.allocator].check(self.params))
        _check_fits(self.spec)
        _check_batch(self.batch_size)

    def label(self) -> str:
        a = ALLOCATORS[self.allocator]
        return (f"{a.label} sparsities at S = {self.sparsity:.0%} ({params_text(self.params, a.params)}) of "
                f"{self.spec.model.name} on {self.spec.calib.nsamples}×{self.spec.calib.seqlen} tokens")

    def makes(self) -> frozenset[str]:
        return frozenset({_result(self.spec, self.allocator, self.sparsity, self.params)})

    def needs(self) -> frozenset[str]:
        return frozenset({_result(self.spec)})


def _predictor_spec(d: dict):
    from pruner.predictor.table import PredictorSpec

    d = dict(d)
    return PredictorSpec(stats=spec_from_dict(d.pop("stats")), **{**d, "grid": tuple(d.get("grid", ()))})


@dataclass(frozen=True)
class PredictorRequest(Request):
    """Build (or read the cached) damage table of the perplexity predictor (``pruner.predictor.table``)."""

    kind: ClassVar[str] = "predictor"
    _decoders: ClassVar[dict] = {"spec": _predictor_spec}
    spec: object  # pruner.predictor.table.PredictorSpec
    data_dir: str | None = None

    def __post_init__(self):
        _check_fits(self.spec.stats)

    def to_dict(self) -> dict:
        s = self.spec
        return {"spec": {"stats": spec_to_dict(s.stats), "method": s.method, "windows": s.windows,
                         "window_tokens": s.window_tokens, "grid": list(s.grid), "around": s.around},
                "data_dir": self.data_dir}

    def label(self) -> str:
        s = self.spec
        where = "" if s.around is None else f" around S = {s.around:.0%}"
        return (f"perplexity predictor of {s.stats.model.name}{where} ({s.method} masks, {len(s.grid)} sparsities "
                f"per block, {s.windows} held-out windows)")


@dataclass(frozen=True)
class PruneRequest(Request):
    """Prune as ``spec`` says, store the run, then (optionally) its perplexity."""

    kind: ClassVar[str] = "prune"
    _decoders: ClassVar[dict] = {"spec": spec_from_dict, "perplexity": _perplexity_options}
    spec: PruneSpec
    perplexity: PerplexityOptions | None = None
    data_dir: str | None = None
    force: bool = False
    batch_size: int = 4
    #: read blocks from the checkpoint one at a time and write pruned ones straight to disk (``pruner.model.streaming``)
    stream: bool = False
    #: choose the allocator's parameters first by the perplexity predictor (held-out data, never the test split)
    tune: bool = False
    #: after the evaluation, remove the run's weight files and keep its manifest and metrics (studies of many
    #: prunes, where only the numbers are wanted; ``pruner.runs.manifest.drop_weights``)
    drop_weights: bool = False

    def __post_init__(self):
        _check_fits(self.spec.stats_spec)
        _check_batch(self.batch_size)
        if self.drop_weights and self.perplexity is None:
            raise ValueError("dropping the weights keeps only the evaluations: ask for one (perplexity), or keep them")
        if self.tune and (ALLOCATORS[self.spec.allocator].learned or not ALLOCATORS[self.spec.allocator].params):
            raise ValueError(f"allocator {self.spec.allocator!r} has no parameters to tune")

    def label(self) -> str:
        return (self.spec.label() + (" (parameters tuned on the predictor)" if self.tune else "")
                + (f" → {self.perplexity.label()}" if self.perplexity else "")
                + (", weights dropped after" if self.drop_weights else ""))

    def needs(self) -> frozenset[str]:
        s, learned = self.spec, ALLOCATORS[self.spec.allocator].learned
        return frozenset({_result(s.stats_spec),
                          *([_result(s.stats_spec, s.allocator, s.sparsity, s.allocator_params)] if learned else [])})


@dataclass(frozen=True)
class EvalRequest(Request):
    """Evaluate stored run ``run``: perplexity, zero-shot accuracy and/or CPU speed (at least one)."""

    kind: ClassVar[str] = "eval"
    _decoders: ClassVar[dict] = {"perplexity": _perplexity_options,
                                 "zeroshot": lambda d: ZeroshotOptions(**{**d, "tasks": d.get("tasks") and tuple(d["tasks"])}),
                                 "speed": lambda d: SpeedSpec(**d)}
    run: str
    perplexity: PerplexityOptions | None = None
    zeroshot: ZeroshotOptions | None = None
    speed: SpeedSpec | None = None
    engine: str = "auto"
    data_dir: str | None = None

    def __post_init__(self):
        check_key(self.run)
        if not (self.perplexity or self.zeroshot or self.speed):
            raise ValueError("nothing to evaluate: ask for perplexity, zero-shot accuracy and/or CPU speed-up")
        if self.engine not in SPEED_ENGINES:
            raise ValueError(f"engine must be one of {', '.join(SPEED_ENGINES)}; got {self.engine!r}")

    def label(self) -> str:
        speed = "CPU speed-up" + (" in OpenVINO (8-bit)" if self.engine == "openvino" else "")
        what = [o.label() for o in (self.perplexity, self.zeroshot) if o] + ([speed] if self.speed else [])
        return f"{' + '.join(what)} of run {self.run}"


@dataclass(frozen=True)
class DenseRequest(Request):
    """WikiText-2 perplexity of the dense model ``model``: the baseline every pruned run is read against (stored
    beside the model's other dense metrics, under the same protocol names as runs' perplexities)."""

    kind: ClassVar[str] = "dense"
    _decoders: ClassVar[dict] = {"model": lambda d: ModelSpec(**d), "perplexity": _perplexity_options}
    model: ModelSpec
    perplexity: PerplexityOptions = PerplexityOptions()
    data_dir: str | None = None

    def label(self) -> str:
        return f"dense {self.perplexity.label()} of {self.model.name}"


@dataclass(frozen=True)
class RecoverRequest(Request):
    """LoRA-recover stored run ``spec.parent``; store it as a new run; perplexity before and after (same chunks)."""

    kind: ClassVar[str] = "recover"
    _decoders: ClassVar[dict] = {"spec": lambda d: RecoverSpec(**d), "perplexity": _perplexity_options}
    spec: RecoverSpec
    perplexity: PerplexityOptions | None = None
    data_dir: str | None = None
    force: bool = False

    def __post_init__(self):
        check_key(self.spec.parent)

    def label(self) -> str:
        s = self.spec
        return f"LoRA recovery (r={s.rank}, {s.steps} steps) of run {s.parent}"


# ---------------------------------------------------------------------------------------------------------------
# Workflows


def _perplexity(folder: Path, options: PerplexityOptions, data_dir, ctx: Context) -> dict:
    return metrics.evaluate_perplexity(folder, data_dir, max_chunks=options.max_chunks, seqlen=options.seqlen,
                                       device=ctx.device,
                                       progress=ctx.phase("perplexity, block by block" if options.stream
                                                          else "perplexity"),
                                       should_cancel=ctx.should_cancel, stream=options.stream)


def run_stats(req: StatsRequest, ctx: Context) -> dict:
    stats = get_stats(req.spec, ctx.cache_dir, progress=ctx.phase("statistics"), should_cancel=ctx.should_cancel,
                      batch_size=req.batch_size, stream=req.stream)
    return {"stats_key": req.spec.key(), "blocks": stats.n_blocks}


def run_learn(req: LearnRequest, ctx: Context) -> dict:
    result = learn_allocation(req.spec, req.allocator, req.sparsity, req.params, ctx.cache_dir,
                              progress=ctx.phase("learn allocation"), should_cancel=ctx.should_cancel,
                              batch_size=req.batch_size, stream=req.stream)
    return {"learned_key": learned_key(req.spec, req.allocator, req.sparsity, req.params), "seconds": result["seconds"]}


def tuned_spec(spec: PruneSpec, ctx: Context, data_dir=None) -> tuple[PruneSpec, dict]:
    """``spec`` with its allocator's parameters tuned on the perplexity predictor (the damage table of its model
    and calibration set around its S, built first when missing) and the record of how.

    The table prunes each block with the spec's own method where a table can be built with it (Wanda, magnitude);
    for a method that also updates the kept weights (SparseGPT, ADMM) it is a Wanda table, and the record carries a
    ``caveat`` saying so: those updates change what each block's pruning costs, and a parameter chosen on Wanda's
    costs can be a poor one for them (docs/results.md: with SparseGPT at 70%, ATP's δ tuned on the Wanda table was
    10.6% worse than uniform, while δ = 0.01 was 25% better)."""
    from pruner.predictor.cache import get_damage_table
    from pruner.predictor.table import TABLE_METHODS, PredictorSpec
    from pruner.predictor.tuning import tune_parameters

    table_method = spec.method if spec.method in TABLE_METHODS else "wanda"
    predictor = PredictorSpec(spec.stats_spec, method=table_method, around=spec.sparsity)
    table = get_damage_table(predictor, ctx.cache_dir, data_dir=data_dir if data_dir is not None
                             else spec.calib.data_dir, progress=ctx.phase("damage table"),
                             should_cancel=ctx.should_cancel)
    t = tune_parameters(table, get_stats(spec.stats_spec, ctx.cache_dir), spec.allocator, spec.sparsity)
    record = {"by": "perplexity predictor", "predictor": predictor.key(), "table_method": table_method,
              "predicted_perplexity": t["predicted"], "tried": t["tried"], "skipped": t["skipped"],
              "params": t["params"]}
    if table_method != spec.method:
        record["caveat"] = (f"tuned on a {table_method} damage table: {spec.method} updates the kept weights, which "
                            f"changes each block's cost, so these parameters may not be the best for it (check "
                            f"against the untuned allocation)")
    return dataclasses.replace(spec, allocator_params=t["params"]), record


def run_prune(req: PruneRequest, ctx: Context) -> dict:
    spec, tuning = (tuned_spec(req.spec, ctx, req.data_dir) if req.tune else (req.spec, None))
    folder = prune_to_run(spec, ctx.cache_dir, progress=ctx.progress, should_cancel=ctx.should_cancel,
                          force=req.force, batch_size=req.batch_size, stream=req.stream, tuning=tuning)
    out = {"run": spec.key(), "folder": str(folder), "details": {}, **({"tuning": tuning} if tuning else {})}
    if req.perplexity is not None:
        out["details"]["perplexity"] = r = _perplexity(folder, req.perplexity, req.data_dir, ctx)
        out["perplexity"] = r["perplexity"]
    if req.drop_weights:
        from pruner.runs.manifest import drop_weights

        out["dropped_bytes"] = drop_weights(folder)
    return out


def run_eval(req: EvalRequest, ctx: Context) -> dict:
    folder = run_folder(req.run, ctx.cache_dir)
    out = {"run": req.run, "details": {}}  # details: each evaluation's full result (the CLI prints them)
    if req.perplexity is not None:
        out["details"]["perplexity"] = r = _perplexity(folder, req.perplexity, req.data_dir, ctx)
        out["perplexity"] = r["perplexity"]
    if req.zeroshot is not None:
        z = req.zeroshot
        tasks = list(z.tasks) if z.tasks else None
        # the dense model's accuracy on the same tasks and limit is the charts' reference (cached after once)
        metrics.dense_zeroshot(read_run(folder).model_spec(), req.data_dir, ctx.cache_dir, tasks=tasks,
                               limit=z.limit, source=z.source, batch_size=z.batch_size,
                               progress=ctx.phase("dense zero-shot tasks"), should_cancel=ctx.should_cancel)
        r = metrics.evaluate_zeroshot(folder, req.data_dir, tasks=tasks, limit=z.limit, source=z.source,
                                      device=ctx.device, batch_size=z.batch_size,
                                      progress=ctx.phase("zero-shot tasks"), should_cancel=ctx.should_cancel)
        out["details"]["zeroshot"] = r
        out["mean_acc"] = r["mean_acc"]
    if req.speed is not None:
        ctx.check_cancel("the speed measurement")
        r = metrics.evaluate_speed(folder, req.speed, ctx.cache_dir, engine=req.engine, progress=ctx.progress,
                                   data_dir=req.data_dir, int8_perplexity=req.perplexity)
        out["details"]["speed"] = r
        out["speedup"] = r["speedup"]
    return out


def run_predictor(req: PredictorRequest, ctx: Context) -> dict:
    from pruner.predictor.cache import get_damage_table

    table = get_damage_table(req.spec, ctx.cache_dir, data_dir=req.data_dir, progress=ctx.phase("damage table"),
                             should_cancel=ctx.should_cancel)
    return {"predictor_key": req.spec.key(), "dense_perplexity": table.dense_perplexity,
            "seconds": table.meta.get("seconds"), "probe_seconds": (table.compounding or {}).get("seconds")}


def run_recover(req: RecoverRequest, ctx: Context) -> dict:
    parent = run_folder(req.spec.parent, ctx.cache_dir)
    folder = recover_run(parent, req.spec, req.data_dir, ctx.cache_dir, device=ctx.device, progress=ctx.progress,
                         should_cancel=ctx.should_cancel, force=req.force)
    out = {"run": folder.name, "parent": req.spec.parent, "details": {}}
    if req.perplexity is not None:
        for name, f in (("perplexity_before", parent), ("perplexity", folder)):
            out["details"][name] = r = _perplexity(f, req.perplexity, req.data_dir, ctx)
            out[name] = r["perplexity"]
    return out


def run_dense(req: DenseRequest, ctx: Context) -> dict:
    r = metrics.dense_perplexity(req.model, req.data_dir, ctx.cache_dir, max_chunks=req.perplexity.max_chunks,
                                 seqlen=req.perplexity.seqlen, progress=ctx.phase("perplexity"))
    return {"perplexity": r["perplexity"], "details": {"perplexity": r}}


#: kind → (request type, workflow). The job worker dispatches through it; so does ``run``.
WORKFLOWS: dict[str, tuple[type[Request], Callable[[Request, Context], dict]]] = {
    r.kind: (r, fn) for r, fn in ((StatsRequest, run_stats), (LearnRequest, run_learn), (PruneRequest, run_prune),
                                  (EvalRequest, run_eval), (RecoverRequest, run_recover),
                                  (PredictorRequest, run_predictor), (DenseRequest, run_dense))
}


def request_from_dict(kind: str, payload: dict) -> Request:
    """The typed request a job stores as (kind, payload)."""
    if kind not in WORKFLOWS:
        raise ValueError(f"request kind must be one of {', '.join(WORKFLOWS)}; got {kind!r}")
    return WORKFLOWS[kind][0].from_dict(payload)


def run(request: Request, ctx: Context | None = None) -> dict:
    """Run one request to completion; returns its JSON-able result."""
    reset_peak_rss()  # the peak memory it records is its own, not an earlier request's (a worker runs many)
    return WORKFLOWS[request.kind][1](request, ctx or Context())
