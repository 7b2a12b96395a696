"""Frozen, validated descriptions of what to compute.

Specs are the only thing that crosses from the CLI and the pages into the library. Each validates itself in
``__post_init__`` (bad input raises ``ValueError`` naming the allowed values, before any work is done) and has a
``key()``: a stable hash of its content, used to name cache folders.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pruner.allocation import ALLOCATORS, EXPERT_PARAMS, check_expert_split, check_sparsity
from pruner.methods import METHODS, NM, SCOPES
from pruner.model.catalogue import ModelSpec
from pruner.store.formats import PRUNE_FORMAT_VERSION, stable_hash

CALIB_DATASETS = ("c4",)

#: Named calibration presets: (nsamples, seqlen).
#: ``cpu`` suits a 2-core machine; ``paper`` is the Wanda/SparseGPT/OWL protocol (128 C4 samples of 2048 tokens);
#: ``tiny`` is for tests and quick demos.
CALIB_PRESETS = {
    "tiny": (8, 128),
    "cpu": (32, 512),
    "paper": (128, 2048),
}
DEFAULT_CALIB_PRESET = "cpu"


@dataclass(frozen=True)
class CalibSpec:
    """Calibration data: ``nsamples`` windows of ``seqlen`` tokens drawn with ``seed``.

    ``data_dir`` is a local folder in the layout of ``../shared/data``; ``None`` loads from the hub.
    """

    dataset: str = "c4"
    nsamples: int = CALIB_PRESETS[DEFAULT_CALIB_PRESET][0]
    seqlen: int = CALIB_PRESETS[DEFAULT_CALIB_PRESET][1]
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self):
        if self.dataset not in CALIB_DATASETS:
            raise ValueError(f"calibration dataset must be one of {', '.join(CALIB_DATASETS)}; got {self.dataset!r}")
        if not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise ValueError(f"nsamples must be an integer >= 1; got {self.nsamples!r}")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ValueError(f"seqlen must be an integer >= 2; got {self.seqlen!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {self.seed!r}")
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(Path(self.data_dir).expanduser().resolve()))

    @classmethod
    def preset(cls, name: str, **overrides) -> "CalibSpec":
        if name not in CALIB_PRESETS:
            raise ValueError(f"calibration preset must be one of {', '.join(CALIB_PRESETS)}; got {name!r}")
        nsamples, seqlen = CALIB_PRESETS[name]
        return cls(**{"nsamples": nsamples, "seqlen": seqlen, **overrides})

    def identity(self) -> dict:
        # The data directory's location does not change the data; its contents are identified by the dataset name.
        d = dataclasses.asdict(self)
        d["source"] = "local" if self.data_dir is not None else "hub"
        del d["data_dir"]
        return d

    def key(self) -> str:
        return stable_hash(self.identity())


@dataclass(frozen=True)
class StatsSpec:
    """Outlier statistics of a dense model on a calibration set (M-independent; M is applied at query time)."""

    model: ModelSpec = ModelSpec()
    calib: CalibSpec = CalibSpec()

    def key(self) -> str:
        from pruner.store.formats import STATS_FORMAT_VERSION

        return stable_hash(
            {"model": self.model.identity(), "calib": self.calib.identity(), "format": STATS_FORMAT_VERSION}
        )


@dataclass(frozen=True)
class PruneSpec:
    """One pruning run: model + calibration + allocator (with its parameters) + method (with its parameters) +
    target sparsity (+ N:M).

    ``allocator_params`` / ``method_params`` are checked against the registry entry's declared parameters
    (``pruner.core.params``): missing ones take their defaults, undeclared ones are an error, so two specs that prune
    alike have one key. With ``nm`` (e.g. "2:4") the target sparsity is 1 − N/M; a non-uniform allocator then gives
    each block its own N (OWL's mixed N:M), N_i = round(M · (1 − s_i)).
    """

    model: ModelSpec = ModelSpec()
    calib: CalibSpec = CalibSpec()
    allocator: str = "uniform"
    method: str = "wanda"
    sparsity: float = 0.5
    allocator_params: dict = dataclasses.field(default_factory=dict)
    method_params: dict = dataclasses.field(default_factory=dict)
    nm: str | None = None
    scope: str | None = None
    #: prune what can be pruned and leave dense the block weights the tool cannot prune (``pruner.model.anatomy``); the
    #: manifest lists them. False: such a model is refused with their names.
    leave_unsupported_dense: bool = False
    #: how a block's sparsity is shared among its routed experts (``pruner.allocation.EXPERT_SPLITS``) and that
    #: split's parameters (λₑ, Mₑ); 'uniform' gives each expert the block's allocation
    expert_split: str = "uniform"
    expert_params: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {self.allocator!r}; choose one of {', '.join(ALLOCATORS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {self.scope!r}")
        check_sparsity(self.sparsity)
        if self.nm is not None:
            nm = NM.parse(self.nm)
            if abs(nm.sparsity - self.sparsity) > 1e-9:
                raise ValueError(f"with N:M {nm} the target sparsity is {nm.sparsity:g}; got {self.sparsity:g}")
            object.__setattr__(self, "nm", str(nm))
        object.__setattr__(self, "sparsity", float(self.sparsity))
        object.__setattr__(self, "allocator_params", ALLOCATORS[self.allocator].check(self.allocator_params))
        object.__setattr__(self, "method_params", METHODS[self.method].check(self.method_params))
        object.__setattr__(self, "scope", self.scope or METHODS[self.method].default_scope)
        object.__setattr__(self, "expert_params", check_expert_split(self.expert_split, self.expert_params))

    def __hash__(self):  # the parameter dicts are not hashable; the key says everything that matters
        return hash(self.key())

    @property
    def stats_spec(self) -> StatsSpec:
        return StatsSpec(model=self.model, calib=self.calib)

    def identity(self) -> dict:
        d = {k: getattr(self, k) for k in ("allocator", "allocator_params", "method", "method_params", "sparsity",
                                           "nm", "scope")}
        # a parameter added later is in the key only when not at its default
        d["allocator_params"] = ALLOCATORS[self.allocator].keyed(self.allocator_params)
        if self.allocator in ALLOCATORS and ALLOCATORS[self.allocator].learned:
            # a learned allocation depends on how it was learned (BESA's epochs, the predictor's table): so does the run
            d["learner"] = ALLOCATORS[self.allocator].resolve_learner().settings
        # only when set: the keys of every run made before these existed stay valid
        if self.leave_unsupported_dense:
            d["leave_unsupported_dense"] = True
        if self.expert_split != "uniform":
            d["expert_split"], d["expert_params"] = self.expert_split, self.expert_params
        return {"model": self.model.identity(), "calib": self.calib.identity(), **d, "format": PRUNE_FORMAT_VERSION}

    def key(self) -> str:
        return stable_hash(self.identity())

    def label(self) -> str:
        from pruner.core.params import params_text

        split = (f", experts by {self.expert_split} ({params_text(self.expert_params, EXPERT_PARAMS)})"
                 if self.expert_split != "uniform" else "")
        return run_label(self.method, self.method_params, self.allocator, self.allocator_params, self.sparsity,
                         self.nm) + split


def run_label(method: str, method_params: dict, allocator: str, allocator_params: dict, sparsity: float,
              nm: str | None) -> str:
    """'admm (ρ=1, iterations=20) + owl (λ=0.08, M=5) @ 70%' — parameters by their paper symbols."""
    from pruner.core.params import params_text

    def part(name, params, declared):
        return f"{name} ({params_text(params, declared)})" if params else name

    declared_a = ALLOCATORS[allocator].params if allocator in ALLOCATORS else ()
    declared_m = METHODS[method].params if method in METHODS else ()
    return (f"{part(method, method_params, declared_m)} + {part(allocator, allocator_params, declared_a)} "
            f"@ {sparsity:.0%}" + (f", {nm}" if nm else ""))


def spec_to_dict(spec) -> dict:
    """JSON-able form of a StatsSpec or PruneSpec (for the job table)."""
    return {"type": type(spec).__name__, **dataclasses.asdict(spec)}


def spec_from_dict(payload: dict):
    """Inverse of ``spec_to_dict``."""
    data = dict(payload)
    kind = data.pop("type", None)
    if kind not in ("StatsSpec", "PruneSpec"):
        raise ValueError(f"spec type must be StatsSpec or PruneSpec; got {kind!r}")
    model = ModelSpec(**data.pop("model"))
    calib = CalibSpec(**data.pop("calib"))
    return (StatsSpec if kind == "StatsSpec" else PruneSpec)(model=model, calib=calib, **data)
