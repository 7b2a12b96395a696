"""Frozen, validated descriptions of what to compute.

Specs are the only thing that crosses from the CLI and the pages into the library. Each validates itself in
``__post_init__`` (bad input raises ``ValueError`` naming the allowed values, before any work is done) and has a
``key()``: a stable hash of its content, used to name cache folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
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


def stable_hash(payload: dict, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable dict, independent of key order."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class ModelSpec:
    """Which causal LM to load.

    ``name`` is one of: a bundled name (see ``pruner.models.BUNDLED``), a path to a local Hugging Face folder, or
    a hub id such as ``HuggingFaceTB/SmolLM2-135M`` (needs internet on first use).
    """

    name: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("model name must be a bundled name, a local folder or a hub id; got an empty name")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")

    def identity(self) -> dict:
        """What determines the weights (not where they are computed)."""
        from pruner.models import model_identity

        return model_identity(self)

    def key(self) -> str:
        return stable_hash(self.identity())


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
        from pruner.stats import STATS_FORMAT_VERSION

        return stable_hash(
            {"model": self.model.identity(), "calib": self.calib.identity(), "format": STATS_FORMAT_VERSION}
        )


#: Bump when pruning semantics change (it is part of the run key).
PRUNE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PruneSpec:
    """One pruning run: model + calibration + allocator (+ λ, M) + method + target sparsity (+ N:M).

    With ``nm`` (e.g. "2:4") the target sparsity is 1 − N/M; a non-uniform allocator then gives each block its own
    N (OWL's mixed N:M), N_i = round(M · (1 − s_i)).
    """

    model: ModelSpec = ModelSpec()
    calib: CalibSpec = CalibSpec()
    allocator: str = "uniform"
    method: str = "wanda"
    sparsity: float = 0.5
    lam: float | None = None
    m: float | None = None
    nm: str | None = None
    scope: str | None = None
    beta: float | None = None  # BESA's penalty weight β (learned allocator only)

    def __post_init__(self):
        from pruner.allocation import ALLOCATORS, BESA_DEFAULT_BETA, OWL_DEFAULT_LAMBDA, OWL_DEFAULT_M, check_beta
        from pruner.methods import METHODS, NM, SCOPES

        if self.allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {self.allocator!r}; choose one of {', '.join(ALLOCATORS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {self.scope!r}")
        if not isinstance(self.sparsity, (int, float)) or not (0 < self.sparsity < 1):
            raise ValueError(f"target sparsity S must be in (0, 1); got {self.sparsity!r}")
        if self.nm is not None:
            nm = NM.parse(self.nm)
            if abs(nm.sparsity - self.sparsity) > 1e-9:
                raise ValueError(f"with N:M {nm} the target sparsity is {nm.sparsity:g}; got {self.sparsity:g}")
            object.__setattr__(self, "nm", str(nm))
        uses = ALLOCATORS[self.allocator].params
        # Normalise: parameters the allocator ignores are dropped, the ones it uses get their defaults.
        object.__setattr__(self, "lam", (OWL_DEFAULT_LAMBDA if self.lam is None else float(self.lam)) if "lam" in uses else None)
        object.__setattr__(self, "m", (OWL_DEFAULT_M if self.m is None else float(self.m)) if "m" in uses else None)
        object.__setattr__(self, "beta", (BESA_DEFAULT_BETA if self.beta is None else check_beta(self.beta))
                           if "beta" in uses else None)
        if self.lam is not None and self.lam < 0:
            raise ValueError(f"λ (lam) must be ≥ 0; got {self.lam:g}")
        if self.m is not None and self.m <= 0:
            raise ValueError(f"M must be > 0; got {self.m:g}")
        object.__setattr__(self, "scope", self.scope or METHODS[self.method].default_scope)

    @property
    def stats_spec(self) -> StatsSpec:
        return StatsSpec(model=self.model, calib=self.calib)

    def identity(self) -> dict:
        d = {k: getattr(self, k) for k in ("allocator", "method", "sparsity", "lam", "m", "nm", "scope")}
        if self.beta is not None:  # only learned allocators have it; other runs keep the keys they always had
            d["beta"] = self.beta
        return {"model": self.model.identity(), "calib": self.calib.identity(), **d, "format": PRUNE_FORMAT_VERSION}

    def key(self) -> str:
        return stable_hash(self.identity())

    def label(self) -> str:
        params = "".join(f", {k}={getattr(self, k):g}" for k in ("lam", "m", "beta") if getattr(self, k) is not None)
        nm = f", {self.nm}" if self.nm else ""
        return f"{self.method} + {self.allocator}{params} @ {self.sparsity:.0%}{nm}"


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
