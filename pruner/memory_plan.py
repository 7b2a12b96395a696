"""Memory is planned, not discovered: a prune's peak resident memory estimated before anything is loaded.

The estimate adds up what the one blockwise loop holds at its worst moment, from the model's config alone (its
skeleton is built on the meta device, so any architecture works):

* the runtime: Python, torch, transformers, the tokenizer and the tokenized calibration text;
* the weights: all of them in memory, or — streamed — the modules outside the blocks, the largest block and the
  shard writer's buffer (``pruner.streaming.DEFAULT_SHARD_BYTES``);
* the calibration activations: the hidden states of every sample entering the current block (twice at the end,
  when they are concatenated), plus one mini-batch's transient tensors inside a block (MLP and attention);
* the method's state for the block: Wanda's scores and mask of the largest layer; SparseGPT's and ADMM's Hessians
  (one per layer, an upper bound on the shared ones) and the working copies of the largest layer.

``check_fits`` compares it with the memory the process may use (``available_bytes``: a cgroup limit, the
``PRUNER_MEMORY_LIMIT`` setting, or what the machine has free) and refuses with the numbers and the ways out.
``bench/stream_memory.py`` prints the plan next to the measured peak.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

#: Resident memory of a process that imported torch, transformers and this package, loaded a tokenizer and
#: tokenized the local C4 sample (VmHWM measured at 0.555 GiB on the development machine, SmolLM2's tokenizer).
RUNTIME_BYTES = int(0.56 * 2**30)
#: What the memory a process may use is called in error messages and settings.
LIMIT_SETTING = "PRUNER_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class MemoryPlan:
    """Estimated peak resident bytes of one job, by part."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def text(self) -> str:
        return f"about {gib(self.total)} (" + ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items()) + ")"


def plan_prune(config, *, dtype_bytes: int, method: str, nsamples: int, seqlen: int, batch_size: int,
               streamed: bool, needs_inputs: bool = True, trust_remote_code: bool = False) -> MemoryPlan:
    """The plan of a prune of the model ``config`` (a transformers config) describes."""
    from pruner.calibrate import mini_batch_size
    from pruner.models import find_blocks, layer_shape, prunable_layers
    from pruner.streaming import DEFAULT_SHARD_BYTES, empty_model

    model = empty_model(config, trust_remote_code=trust_remote_code)
    cfg = model.config
    _, blocks = find_blocks(model)
    block_bytes = [sum(p.numel() for p in b.parameters()) * dtype_bytes for b in blocks]
    total_bytes = sum(p.numel() for p in model.parameters()) * dtype_bytes
    outside = total_bytes - sum(block_bytes)
    shapes = [layer_shape(layer) for layer in prunable_layers(blocks[0]).values()]
    largest = max(o * i for o, i in shapes)
    hidden = cfg.hidden_size
    intermediate = getattr(cfg, "intermediate_size", 4 * hidden)
    heads = getattr(cfg, "num_attention_heads", 1)
    plan = MemoryPlan({"runtime": RUNTIME_BYTES})
    if streamed:
        plan.parts["weights outside the blocks"] = outside
        plan.parts["one block"] = max(block_bytes)
        plan.parts["shard writer buffer"] = min(DEFAULT_SHARD_BYTES, total_bytes)
    else:
        plan.parts["weights"] = total_bytes
    if needs_inputs:
        batch = mini_batch_size(nsamples, batch_size)
        act = 4 if dtype_bytes == 4 else dtype_bytes
        plan.parts["calibration activations"] = 2 * nsamples * seqlen * hidden * act
        plan.parts["one mini-batch inside a block"] = (batch * seqlen * (2 * intermediate + 4 * hidden) * act
                                                      + batch * heads * seqlen * seqlen * 4)
    float32 = 4
    if method in ("sparsegpt", "admm", "admm-gradual"):
        plan.parts["Hessians"] = sum(i * i for _, i in shapes) * float32
        max_in = max(i for _, i in shapes)
        plan.parts["reconstruction workspace"] = 2 * largest * float32 + 2 * max_in * max_in * float32
    else:  # magnitude and Wanda: the largest layer's scores, their selection workspace and the mask
        plan.parts["scores and mask"] = largest * (2 * float32 + 1)
    return plan


def plan_for_spec(spec, cache_dir=None, *, batch_size: int, streamed: bool) -> MemoryPlan:
    """``plan_prune`` for a ``PruneSpec``, reading only the model's config (a bundled model is converted first)."""
    from pruner.methods import METHODS
    from pruner.models import convert_bundled, model_source

    source = model_source(spec.model)
    if source == "bundled":
        where = str(convert_bundled(spec.model.name, cache_dir))
    else:
        where = spec.model.name
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(where, trust_remote_code=spec.model.trust_remote_code,
                                        **({"revision": spec.model.revision} if source == "hub" else {}))
    return plan_prune(config, dtype_bytes=4 if spec.model.dtype == "float32" else 2, method=spec.method,
                      nsamples=spec.calib.nsamples, seqlen=spec.calib.seqlen, batch_size=batch_size,
                      streamed=streamed, needs_inputs=METHODS[spec.method].needs_inputs,
                      trust_remote_code=spec.model.trust_remote_code)


def parse_bytes(text: str) -> int:
    """'3GiB', '512 MB', '2g', '1500000000' → bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{LIMIT_SETTING}={text!r}: expected a size such as 6GiB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max or v1 memory.limit_in_bytes), if any."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            value = candidate.read_text().strip()
        except OSError:
            continue
        if value != "max" and int(value) < 2**60:
            return int(value)
    return None


def _machine_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 2**10
    except OSError:
        pass
    return None


def available_bytes() -> tuple[int | None, str]:
    """(bytes the process may use, where that number comes from): the smallest of the ``PRUNER_MEMORY_LIMIT``
    setting, the cgroup's limit and the machine's available memory (None when none is known)."""
    candidates = []
    if os.environ.get(LIMIT_SETTING):
        candidates.append((parse_bytes(os.environ[LIMIT_SETTING]), f"{LIMIT_SETTING}"))
    limit = _cgroup_limit()
    if limit is not None:
        candidates.append((limit, "the cgroup's memory limit"))
    free = _machine_available()
    if free is not None:
        candidates.append((free, "the machine's available memory"))
    return min(candidates) if candidates else (None, "unknown")


def check_fits(plan: MemoryPlan, *, streamed: bool, what: str = "this prune") -> None:
    """Raise ``MemoryError``-like ``ValueError`` when ``plan`` exceeds the memory the process may use, naming the
    numbers and the ways out."""
    allowed, source = available_bytes()
    if allowed is None or plan.total <= allowed:
        return
    ways = [] if streamed else ["--stream (weights: one block at a time instead of all of them)"]
    ways += ["fewer calibration samples (--nsamples) or shorter ones (--seqlen)", "a smaller --batch-size",
             "--dtype bfloat16 (half the weights and activations)"]
    raise ValueError(f"{what} needs {plan.text()}, but {gib(allowed)} is allowed ({source}); ways out: "
                     + "; ".join(ways))
