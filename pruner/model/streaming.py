"""Models larger than memory: stream decoder blocks from the safetensors checkpoint.

The model is built as a skeleton whose parameters sit on the meta device (no memory); only the modules outside
the decoder blocks (embeddings, final norm, head, rotary tables) are loaded. The one blockwise loop
(``pruner.engine.calibrate.run_blockwise``) asks a block store for each block when its turn comes: ``StreamedBlocks``
reads that block's tensors from the checkpoint shards onto the compute device, and on release writes the
(possibly pruned) block into the output shards (``ShardWriter``) and puts its parameters back on the meta device.
Memory therefore holds one block, the calibration activations and the non-block modules, whatever the depth.

The in-memory path (``pruner.engine.calibrate.ResidentBlocks``) and this one run the same loop on the same values, so they
give bit-identical pruned weights (``tests/test_streaming.py``).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import torch
from torch import nn

from pruner.model.anatomy import find_blocks

#: File names of a Hugging Face safetensors checkpoint: one file, or shards listed in an index.
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: Output shards are closed once they would exceed this many bytes. The pending shard is the writer's only buffer,
#: so this bounds the memory it adds (whatever the depth); a tensor larger than it gets a shard of its own.
DEFAULT_SHARD_BYTES = 512 * 2**20


class Checkpoint:
    """Where each tensor of a safetensors checkpoint folder lives; reads chosen tensors without loading the rest."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            self.shard_of: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        elif (self.folder / SAFETENSORS_SINGLE).is_file():
            with safe_open(self.folder / SAFETENSORS_SINGLE, "pt") as f:
                self.shard_of = {name: SAFETENSORS_SINGLE for name in f.keys()}
        else:
            raise ValueError(f"{self.folder} has no safetensors weights ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX});"
                             " streaming reads only safetensors checkpoints (save the model with save_pretrained)")

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.shard_of if n.startswith(prefix)]

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors, read shard by shard straight onto ``device``."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name not in self.shard_of:
                raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
            by_shard.setdefault(self.shard_of[name], []).append(name)
        out = {}
        for shard, members in by_shard.items():
            with safe_open(self.folder / shard, "pt", device=str(device)) as f:
                for name in members:
                    out[name] = f.get_tensor(name)
        return out


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype`` (what ``from_pretrained(dtype=...)`` does); others as stored."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


#: Held while a model is constructed in this process. ``init_empty_weights`` replaces ``nn.Module.register_parameter``
#: for every thread while it is active, so a model loaded meanwhile by another thread (a dashboard session planning a
#: job's memory beside one loading the model) got its parameters on the meta device ("Unsupported device type
#: 'meta'"); every construction path takes this lock (re-entrant: a skeleton builds an empty model inside).
MODEL_BUILD_LOCK = threading.RLock()


def empty_model(config, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM ``config`` describes with every parameter on the meta device (no memory) and a tied head tied;
    buffers stay real (rotary tables are computed at construction and are not in checkpoints). Eval mode, no grad."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with MODEL_BUILD_LOCK, init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 **({"dtype": dtype} if dtype is not None else {}))
    model.tie_weights()
    return model.eval().requires_grad_(False)


def build_skeleton(folder: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``folder`` with its decoder blocks' parameters on the meta device and every other module
    loaded (in ``dtype``); tied weights (a head tied to the embeddings) are tied again. Eval mode, no grad."""
    from transformers import AutoConfig

    checkpoint = Checkpoint(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = empty_model(config, dtype, trust_remote_code)
    prefix = find_blocks(model)[0] + "."
    outside = [n for n in checkpoint.names() if not n.startswith(prefix)]
    result = model.load_state_dict(_cast(checkpoint.read(outside), dtype), strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"the checkpoint at {folder} has tensors the model does not: {result.unexpected_keys[:5]}; "
                         "its names differ from the model's, which streaming does not translate")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if missing:
        raise ValueError(f"the checkpoint at {folder} lacks {missing[:5]} (outside the decoder blocks)")
    model.requires_grad_(False)
    return model


class ShardWriter:
    """Writes a model's tensors into safetensors shards as they come (a pending shard is flushed once it holds
    ``max_shard_bytes``), then names them as Hugging Face does and writes the index, so that
    ``AutoModelForCausalLM.from_pretrained(folder)`` loads the result."""

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be at least 1, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self._pending or any(name in names for _, names in self._shards):
                raise ValueError(f"tensor {name!r} was written twice")
            size = tensor.numel() * tensor.element_size()
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self._flush()
            # no copy on CPU: the reference keeps the released block's storage alive until the shard is written
            self._pending[name] = tensor.detach().to("cpu").contiguous()
            self._pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        name = f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, self.folder / name, metadata={"format": "pt"})
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending, give the shards their final names (and an index if there are several); return
        the file names."""
        self._flush()
        if len(self._shards) == 1:
            os.replace(self.folder / self._shards[0][0], self.folder / SAFETENSORS_SINGLE)
            return [SAFETENSORS_SINGLE]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
            files.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        return files + [SAFETENSORS_INDEX]


class StreamedBlocks:
    """A block store (``pruner.engine.calibrate.BlockStore``) that reads each block from ``checkpoint`` when the loop
    reaches it and, on release, hands it to ``writer`` (if any) and returns its memory (parameters back to meta)."""

    def __init__(self, checkpoint: Checkpoint, blocks_path: str, dtype: torch.dtype, writer: ShardWriter | None = None):
        self.checkpoint = checkpoint
        self.blocks_path = blocks_path
        self.dtype = dtype
        self.writer = writer

    def _prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}."

    def fetch(self, index: int, block: nn.Module, device: torch.device) -> None:
        prefix = self._prefix(index)
        # ``state`` holds the only references to the read tensors (fusing experts drops them as it copies them)
        state = _cast({name[len(prefix):]: t
                       for name, t in self.checkpoint.read(self.checkpoint.names(prefix), device).items()}, self.dtype)
        block.load_state_dict(fuse_expert_tensors(block, state), strict=True, assign=True)
        block.requires_grad_(False)

    def release(self, index: int, block: nn.Module) -> None:
        if self.writer is not None:
            prefix = self._prefix(index)
            self.writer.add({prefix + name: t for name, t in block.state_dict().items()})
        block.to("meta")


#: On-disk names of a routed expert's matrices (per-expert layouts: Qwen/OLMoE/DeepSeek and Mixtral's w1/w3/w2).
_EXPERT_FILE_PARTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_EXPERT_FILE_NAME = re.compile(r"^(?P<parent>.*)\.experts\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")


def fuse_expert_tensors(block: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A block's tensors as read from a checkpoint, renamed and fused into what the block's modules hold.

    transformers 5 fuses per-expert checkpoint tensors (``mlp.experts.3.gate_proj.weight``, Mixtral's
    ``block_sparse_moe.experts.3.w1.weight``) into one 3-D parameter per experts module when it loads a model
    (``experts.gate_up_proj`` = per expert [gate; up], ``experts.down_proj``). Streaming reads tensors itself, so it
    does the same for the layouts transformers itself fuses this way (gate and up concatenated, not transposed);
    a checkpoint that already stores fused tensors (as streamed runs and GPT-OSS do) passes through unchanged.
    The per-expert tensors are taken out of ``state`` as they are copied (the caller should hold no other
    reference to them)."""
    from pruner.model.anatomy import is_fused_experts

    expected = set(block.state_dict())
    fused = {name: m for name, m in block.named_modules() if is_fused_experts(m)}
    if not fused or expected <= set(state):
        return state
    out = {k: v for k, v in state.items() if k in expected}
    pieces: dict[str, dict[int, dict[str, str]]] = {}  # parent on disk → expert → part → tensor name
    renames: dict[str, str] = {}  # parent path on disk → path of the module that holds the experts
    for name in state:
        match = _EXPERT_FILE_NAME.match(name)
        if name in expected or match is None or match["part"] not in _EXPERT_FILE_PARTS:
            continue
        pieces.setdefault(match["parent"], {}).setdefault(int(match["expert"]), {})[
            _EXPERT_FILE_PARTS[match["part"]]] = name
    for parent, experts in pieces.items():
        # the experts module whose parent has the same path, else the block's only one (Mixtral's rename)
        path = f"{parent}.experts" if f"{parent}.experts" in fused else (next(iter(fused)) if len(fused) == 1 else None)
        if path is None:
            raise ValueError(f"cannot tell which experts module the checkpoint's {parent}.experts.* belong to")
        module = fused[path]
        if module.is_transposed or not module.is_concatenated:
            raise ValueError(f"{type(module).__name__} keeps its experts transposed or interleaved; streaming reads "
                             "only checkpoints that store them fused or as per-expert [out, in] matrices")
        # each expert's tensors are copied into the fused ones and dropped from ``state`` at once, so memory holds
        # the block's experts about twice at the start of this and once at its end (never three times)
        parts = ("gate", "up") if module.has_gate else ("up",)
        first = state[experts[0][parts[0]]]
        rows = first.shape[0]
        fused_main = first.new_empty((len(experts), rows * len(parts), first.shape[1]))
        down = state[experts[0]["down"]]
        fused_down = down.new_empty((len(experts),) + tuple(down.shape))
        for e in range(len(experts)):
            for k, part in enumerate(parts):
                fused_main[e, k * rows:(k + 1) * rows] = state.pop(experts[e][part])
            fused_down[e] = state.pop(experts[e]["down"])
        out[f"{path}.gate_up_proj" if module.has_gate else f"{path}.up_proj"] = fused_main
        out[f"{path}.down_proj"] = fused_down
        renames[parent] = path.rsplit(".", 1)[0] if "." in path else ""
    for name, tensor in state.items():  # e.g. Mixtral's block_sparse_moe.gate.weight → mlp.gate.weight
        if name in expected:
            continue
        for old, new in renames.items():
            if name.startswith(old + ".") and new + name[len(old):] in expected:
                out[new + name[len(old):]] = tensor
                break
        else:
            out[name] = tensor  # unknown: load_state_dict names it
    return out


def outside_blocks_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors outside its decoder blocks, as ``save_pretrained`` stores them (a head tied to the
    embeddings is left out: loading ties it again)."""
    prefix = find_blocks(model)[0] + "."
    skip = set()
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        skip = {f"{name}.weight" for name, module in model.named_modules() if head is not None and module is head}
    return {n: t for n, t in model.state_dict().items() if not n.startswith(prefix) and n not in skip}
