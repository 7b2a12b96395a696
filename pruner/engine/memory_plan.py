"""Memory is planned, not discovered: a prune's peak resident memory estimated before anything is loaded.

The estimate adds up what the one blockwise loop holds at its worst moment, from the model's config alone (its
skeleton is built on the meta device, so any architecture works):

* the runtime: Python, torch, transformers, the tokenizer and the tokenized calibration text;
* the weights: all of them in memory, or — streamed — the modules outside the blocks, the largest block and the
  shard writer's buffer (``pruner.model.streaming.DEFAULT_SHARD_BYTES``);
* the calibration activations: the hidden states of every sample entering the current block (twice at the end,
  when they are concatenated), plus one mini-batch's transient tensors inside a block (MLP and attention);
* the method's state for the block: Wanda's scores and mask of the largest layer; SparseGPT's and ADMM's Hessians
  (one per layer, an upper bound on the shared ones) and the working copies of the largest layer;
* a learned allocation (BESA) learned in the same job: the block's recorded inputs and outputs, its per-weight
  state (a float copy, ranks, candidate buckets, the masked weights and their gradient) and the autograd
  activations of one mini-batch.

On a GPU the plan has two sides: host memory (runtime, the weights that wait their turn, offloaded activations)
and device memory (the block being worked on, the activations unless offloaded, the method's state).

Evaluations that need the whole model (zero-shot accuracy, CPU speed, perplexity without ``--stream``) have their
own plan (``plan_whole_model``).

``check_fits`` compares a plan with the memory the process may use (``available_bytes``: a cgroup limit, the
``PRUNER_MEMORY_LIMIT`` setting, or what the machine has free; on CUDA the device's free memory) and refuses with
the numbers and the ways out. ``bench/stream_memory.py`` prints the plan next to the measured peak.
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
#: The longest zero-shot request of the seven tasks, prompt and continuation: a BoolQ passage with its question
#: is 1,291 tokens with SmolLM2's tokenizer (HellaSwag's longest 160, RTE's 267). lm-eval sorts requests longest
#: first and pads a batch to its longest, so its first batch holds batch × this × vocabulary logits.
LONGEST_ZEROSHOT_TOKENS = 1300
FLOAT32 = 4
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class MemoryPlan:
    """Estimated peak bytes of one job, by part: ``parts`` in host (resident) memory, ``device_parts`` in the
    compute device's memory (empty when the work runs on CPU)."""

    parts: dict[str, int] = field(default_factory=dict)
    device_parts: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    #: bytes the job writes to disk (a prune: the pruned model's weights), checked against the free space first
    writes: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def device_total(self) -> int:
        return sum(self.device_parts.values())

    def add(self, name: str, nbytes: int, on_device: bool) -> None:
        """Count ``nbytes`` under ``name`` on the compute device (``on_device`` and not CPU) or in host memory."""
        (self.device_parts if on_device and self.device != "cpu" else self.parts)[name] = int(nbytes)

    def text(self) -> str:
        host = f"about {gib(self.total)} (" + ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items()) + ")"
        if not self.device_parts:
            return host
        return (host + f" in host memory and about {gib(self.device_total)} on {self.device} ("
                + ", ".join(f"{k} {gib(v)}" for k, v in self.device_parts.items()) + ")")


@dataclass(frozen=True)
class _Shapes:
    """What a plan reads from a model's config (through its meta-device skeleton)."""

    total_params: int
    block_params: list[int]
    layer_shapes: list[tuple[int, int]]  # (out, in) of the prunable layers of the block with the most prunable weights
    expert_params: int  # the most weights of routed experts in one block (0: no mixture of experts)
    largest_tensor: int  # elements of the largest parameter of any block (a fused experts tensor can be GBs)
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    context: int | None

    @classmethod
    def of(cls, config, trust_remote_code: bool = False) -> "_Shapes":
        from pruner.model.anatomy import ExpertSlice, find_blocks, layer_shape, prunable_layers
        from pruner.model.streaming import empty_model

        model = empty_model(config, trust_remote_code=trust_remote_code)
        cfg = model.config
        _, blocks = find_blocks(model)
        hidden = cfg.hidden_size
        # blocks may differ (DeepSeek-style models keep their first blocks dense): plan for the largest
        units = [list(prunable_layers(b).values()) for b in blocks]
        largest = max(units, key=lambda layers: sum(o * i for o, i in map(layer_shape, layers)))
        experts = [sum(o * i for o, i in (layer_shape(u) for u in layers if isinstance(u, ExpertSlice)))
                   for layers in units]
        return cls(total_params=sum(p.numel() for p in model.parameters()),
                   block_params=[sum(p.numel() for p in b.parameters()) for b in blocks],
                   layer_shapes=[layer_shape(layer) for layer in largest], expert_params=max(experts),
                   largest_tensor=max(p.numel() for b in blocks for p in b.parameters()),
                   hidden=hidden, intermediate=getattr(cfg, "intermediate_size", 4 * hidden),
                   heads=getattr(cfg, "num_attention_heads", 1), vocab=cfg.vocab_size,
                   context=getattr(cfg, "max_position_embeddings", None))


#: Sequential passes whose results the SparseGPT search holds at once: while its seeds are scored, the best seed's,
#: the last one's and the one being computed (``pruner.predictor.search._seeded_state``).
SEARCH_KEPT_FITS = 3
#: ``plan_prune``'s ``learning`` values for the allocation search: with one-shot Wanda masks, with Wanda masks from
#: sequential passes, with SparseGPT (always from sequential passes).
SEARCH_LEARNING = ("search", "search-sequential", "search-sparsegpt")


def learning_kind(allocator: str, params: dict) -> str | bool:
    """``plan_prune``'s ``learning`` value for learning ``allocator`` with these (checked) parameters: the search's
    kind, or True (BESA's pass; the predictor-optimal allocation plans like it)."""
    if allocator != "search":
        return True
    if params.get("sparsegpt"):
        return "search-sparsegpt"
    return "search-sequential" if params.get("sequential") else "search"


def plan_prune(config, *, dtype_bytes: int, method: str, nsamples: int, seqlen: int, batch_size: int,
               streamed: bool, needs_inputs: bool = True, trust_remote_code: bool = False,
               learning: bool | str = False,
               device: str = "cpu", offload: bool = False) -> MemoryPlan:
    """The plan of a prune of the model ``config`` (a transformers config) describes. ``learning``: a learned
    allocation is learned in the same job (True: BESA's pass; "search": the allocation search's state with Wanda masks,
    "search-sparsegpt": with SparseGPT's); ``device``: the compute device ("cpu" or "cuda…");
    ``offload``: the calibration activations stay in host memory."""
    from pruner.engine.calibrate import mini_batch_size
    from pruner.model.streaming import DEFAULT_SHARD_BYTES

    m = _Shapes.of(config, trust_remote_code)
    block_bytes = max(m.block_params) * dtype_bytes
    total_bytes = m.total_params * dtype_bytes
    outside = total_bytes - sum(m.block_params) * dtype_bytes
    largest = max(o * i for o, i in m.layer_shapes)
    plan = MemoryPlan({"runtime": RUNTIME_BYTES}, device=device, writes=total_bytes)
    gpu = device != "cpu"
    if streamed:
        plan.parts["weights outside the blocks"] = outside
        # a pending shard, or one tensor larger than a shard (a fused experts tensor) while it is written
        plan.parts["shard writer buffer"] = min(max(DEFAULT_SHARD_BYTES, m.largest_tensor * dtype_bytes), total_bytes)
        plan.add("one block", block_bytes, on_device=True)
        if m.expert_params:  # per-expert checkpoint tensors are read, then stacked into the fused parameters
            plan.add("a block's experts while they are fused", m.expert_params * dtype_bytes, on_device=True)
    else:
        plan.parts["weights"] = total_bytes
        if gpu:
            plan.add("one block", block_bytes, on_device=True)
    if gpu:  # the embeddings, final norm and head visit the device while block 0's inputs are captured
        plan.add("weights outside the blocks", outside, on_device=True)
    act = FLOAT32 if dtype_bytes == FLOAT32 else dtype_bytes
    activations = nsamples * seqlen * m.hidden * act
    batch = mini_batch_size(nsamples, batch_size)
    one_batch = batch * seqlen * (2 * m.intermediate + 4 * m.hidden) * act + batch * m.heads * seqlen * seqlen * FLOAT32
    if needs_inputs or learning:
        plan.add("calibration activations", 2 * activations, on_device=not offload)
        plan.add("one mini-batch inside a block", one_batch, on_device=True)
    if learning in SEARCH_LEARNING:  # pruner.predictor.search: every block's dense weights and how to prune them
        from pruner.allocation.registry import (SEARCH_KEPT_INPUT_SETS, SEARCH_MAX_SWITCHES, SEARCH_MEASURED,
                                                search_checkpoint_every, search_stage_windows)

        plan.add("the search's dense copy of the blocks' weights", sum(m.block_params) * dtype_bytes, on_device=True)
        if learning == "search-sparsegpt":
            # the factors of H⁻¹ of every block (counted per layer: layers reading one input share theirs) and the
            # pruned weights of every block, of up to three sequential passes at once: while the seeds are scored,
            # the best seed's, the current one's and the next one's (later, the parent's and the refitted child's);
            # and the block levels a generation's measured children can need
            fits = SEARCH_KEPT_FITS
            factors = len(m.block_params) * sum(i * i for _, i in m.layer_shapes) * FLOAT32
            plan.add("the search's SparseGPT factors of H⁻¹ (up to three passes' at once)", fits * factors,
                     on_device=True)
            plan.add("the search's pruned blocks of up to three passes", fits * sum(m.block_params) * FLOAT32,
                     on_device=True)
            plan.add("the search's blocks pruned at other levels, kept",
                     SEARCH_MEASURED * 2 * SEARCH_MAX_SWITCHES * max(m.block_params) * FLOAT32, on_device=True)
        else:
            rank_bytes = 2 if max(i for _, i in m.layer_shapes) < 2 ** 15 else 4  # int16 ranks while rows are short
            plan.add("the search's score ranks", sum(m.block_params) * rank_bytes, on_device=True)
        if learning != "search":  # sequential passes keep the hidden states entering every e-th block (fitness.py)
            kept = len(range(0, len(m.block_params), search_checkpoint_every(len(m.block_params))))
            plan.add("the search's kept block inputs (two passes')", SEARCH_KEPT_INPUT_SETS * kept * activations,
                     on_device=True)
        tokens = search_stage_windows(nsamples, seqlen)[-1] * seqlen  # its last stage's windows
        plan.add("the dense model's next-token log-probabilities", tokens * m.vocab * FLOAT32, on_device=True)
        plan.add("one window's logits and KL divergence", 3 * seqlen * m.vocab * FLOAT32, on_device=True)
    elif learning:
        plan.add("BESA's recorded block inputs and outputs", 2 * activations, on_device=not offload)
        # per weight: its rank and candidate bucket (int64 each), the masked weight and its gradient, and a float32
        # copy when the weights are not float32 already (``.float()`` of a float32 tensor is the tensor itself)
        copy = 0 if dtype_bytes == FLOAT32 else FLOAT32
        plan.add("BESA's per-weight state", max(m.block_params) * (8 + 8 + 2 * FLOAT32 + copy), on_device=True)
        plan.add("BESA's autograd of one mini-batch", 2 * one_batch, on_device=True)
    # the honest count of a pruned block's zeros (pruner.model.anatomy.block_zero_count): one byte per weight of its largest
    # tensor at a time (a fused experts tensor is hundreds of millions of weights)
    plan.add("counting a block's zeros", m.largest_tensor, on_device=True)
    if method in ("sparsegpt", "admm", "admm-gradual"):
        plan.add("Hessians", sum(i * i for _, i in m.layer_shapes) * FLOAT32, on_device=True)
        max_in = max(i for _, i in m.layer_shapes)
        plan.add("reconstruction workspace", 2 * largest * FLOAT32 + 2 * max_in * max_in * FLOAT32, on_device=True)
    else:  # magnitude and Wanda: the largest layer's scores, their selection workspace and the mask
        plan.add("scores and mask", largest * (2 * FLOAT32 + 1), on_device=True)
    return plan


#: What ``plan_whole_model`` plans: evaluations and training that hold the whole model in memory.
WHOLE_MODEL_WORK = ("perplexity", "zero-shot", "speed", "training", "damage table")


def _block_activations(m: "_Shapes", batch: int, tokens: int) -> int:
    """Bytes of one forward's transient tensors inside a block (MLP, attention scores) for ``batch`` × ``tokens``."""
    return batch * tokens * (2 * m.intermediate + 4 * m.hidden) * FLOAT32 + batch * m.heads * tokens * tokens * FLOAT32


def plan_whole_model(config, *, what: str, dtype_bytes: int = FLOAT32, batch_size: int = 1, seqlen: int | None = None,
                     models: int = 1, trust_remote_code: bool = False, device: str = "cpu") -> MemoryPlan:
    """The plan of work that holds the whole model in memory (``dtype_bytes`` per weight: runs are evaluated in
    float32). ``what`` (``WHOLE_MODEL_WORK``):

    * "perplexity": one chunk of ``seqlen`` tokens at a time, its logits and their log-softmax;
    * "zero-shot": lm-eval's longest batch, ``batch_size`` × ``LONGEST_ZEROSHOT_TOKENS`` logits and log-softmax;
    * "speed": ``models`` models (dense and pruned), one further copy of the weights while a graph is exported to
      ONNX, and the export's forward of ``batch_size`` × ``seqlen`` tokens;
    * "training" (LoRA recovery): every block's activations kept for the backward pass (no checkpointing) for
      ``batch_size`` sequences of ``seqlen`` tokens, and the logits, their log-softmax and gradient;
    * "damage table": the hidden states of ``batch_size`` held-out windows of ``seqlen`` tokens entering every
      block (kept for the whole build), and one window batch's logits.
    """
    if what not in WHOLE_MODEL_WORK:
        raise ValueError(f"what must be one of {', '.join(WHOLE_MODEL_WORK)}; got {what!r}")
    m = _Shapes.of(config, trust_remote_code)
    weights = m.total_params * dtype_bytes
    plan = MemoryPlan({"runtime": RUNTIME_BYTES}, device=device)
    if what == "speed":
        plan.parts["weights"] = models * weights
        plan.parts["ONNX export copy of the weights"] = weights
        tokens = seqlen or 1
        plan.parts["the export's forward"] = (_block_activations(m, batch_size, tokens)
                                             + batch_size * tokens * m.vocab * FLOAT32)
        return plan
    plan.add("weights", weights, on_device=True)
    batch = batch_size
    if what == "perplexity":
        tokens = seqlen or m.context or 2048
    elif what == "zero-shot":
        tokens = min(LONGEST_ZEROSHOT_TOKENS, m.context or LONGEST_ZEROSHOT_TOKENS)
    else:
        tokens = seqlen or m.context or 2048
    logits = batch * tokens * m.vocab * FLOAT32
    if what == "training":
        plan.add("activations kept for the backward pass", len(m.block_params) * 2 * _block_activations(m, batch, tokens),
                 on_device=True)
        plan.add("logits, their log-softmax and gradient", 3 * logits, on_device=True)
        return plan
    if what == "damage table":
        plan.add("held-out hidden states entering every block", (len(m.block_params) + 1) * batch * tokens * m.hidden
                 * FLOAT32, on_device=True)
    plan.add("logits and their log-softmax", 2 * logits, on_device=True)
    plan.add("activations inside a block", _block_activations(m, batch, tokens), on_device=True)
    return plan


def check_whole_model(config, what: str, subject: str, *, ways: list[str], **plan_args) -> None:
    """Refuse work that needs the whole model in memory before loading it when its plan (``plan_whole_model``)
    does not fit, naming the numbers and the ``ways`` out."""
    check_fits(plan_whole_model(config, what=what, **plan_args), ways=ways,
               what=f"{what} of {subject} (the whole model in memory)")


def model_config(model_spec, cache_dir=None):
    """The transformers config of the model a ``ModelSpec`` names (a bundled model is converted first)."""
    from transformers import AutoConfig

    from pruner.model.catalogue import hub_unreachable, model_source
    from pruner.model.loading import BrokenModelFolder, convert_bundled

    source = model_source(model_spec)
    where = str(convert_bundled(model_spec.name, cache_dir)) if source == "bundled" else model_spec.name
    offline = hub_unreachable() if source == "hub" else None
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=model_spec.trust_remote_code,
                                          **({"revision": model_spec.revision, "local_files_only": bool(offline)}
                                             if source == "hub" else {}))
    except (OSError, ValueError) as err:
        if source == "hub":
            raise ValueError(f"could not read the config of {model_spec.name!r} from the hub ({type(err).__name__}"
                             + (f"; the hub cannot be reached: {offline}, and the Hugging Face cache does not hold "
                                f"it" if offline else "") + "); without internet, use a bundled model or a local "
                             "folder") from err
        if source != "local":
            raise
        raise BrokenModelFolder(where, err) from err


def plan_for_spec(spec, cache_dir=None, *, batch_size: int, streamed: bool,
                  learning: bool | str = False) -> MemoryPlan:
    """``plan_prune`` for a ``PruneSpec``, reading only the model's config. ``learning``: its learned allocation
    is not cached, so the job learns it first."""
    from pruner.methods import METHODS
    from pruner.model.loading import resolve_device

    return plan_prune(model_config(spec.model, cache_dir), dtype_bytes=4 if spec.model.dtype == "float32" else 2,
                      method=spec.method, nsamples=spec.calib.nsamples, seqlen=spec.calib.seqlen,
                      batch_size=batch_size, streamed=streamed, needs_inputs=METHODS[spec.method].needs_inputs,
                      trust_remote_code=spec.model.trust_remote_code, learning=learning,
                      device=resolve_device(spec.model.device).type, offload=spec.model.offload_activations)


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


def device_available_bytes(device: str) -> int | None:
    """Free memory of a CUDA device (None on CPU, or when it cannot be asked)."""
    if device == "cpu":
        return None
    import torch

    try:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, AssertionError, ValueError):
        return None
    return int(free)


def plan_for_statistics(spec, cache_dir=None, *, batch_size: int, streamed: bool,
                        learning: bool | str = False) -> MemoryPlan:
    """The plan of a statistics pass of a ``StatsSpec`` (the calibration loop holding every sample's activations,
    Wanda's scores of the largest layer), or, with ``learning``, of a learned allocation's pass (BESA), which
    collects the statistics on the way."""
    from pruner.model.loading import resolve_device

    return plan_prune(model_config(spec.model, cache_dir), dtype_bytes=4 if spec.model.dtype == "float32" else 2,
                      method="wanda", nsamples=spec.calib.nsamples, seqlen=spec.calib.seqlen, batch_size=batch_size,
                      streamed=streamed, trust_remote_code=spec.model.trust_remote_code, learning=learning,
                      device=resolve_device(spec.model.device).type, offload=spec.model.offload_activations)


def prune_ways_out(*, streamed: bool, offloaded: bool, device: str) -> list[str]:
    """What a user can change when a prune (or a statistics or learning pass) does not fit."""
    ways = [] if streamed else ["--stream (weights: one block at a time instead of all of them)"]
    if device != "cpu" and not offloaded:
        ways.append("--offload-activations (calibration activations in host memory instead of on the device)")
    return ways + ["fewer calibration samples (--nsamples) or shorter ones (--seqlen)", "a smaller --batch-size",
                   "--dtype bfloat16 (half the weights and activations)"]


def check_fits(plan: MemoryPlan, *, ways: list[str], what: str = "this prune") -> None:
    """Raise ``ValueError`` when ``plan`` exceeds the memory the process may use (host, and the device's when the
    plan has device parts), naming the numbers and the ``ways`` out."""
    allowed, source = available_bytes()
    over = []
    if allowed is not None and plan.total > allowed:
        over.append(f"{gib(allowed)} of host memory is allowed ({source})")
    free = device_available_bytes(plan.device) if plan.device_parts else None
    if free is not None and plan.device_total > free:
        over.append(f"{gib(free)} is free on {plan.device}")
    if over:
        raise ValueError(f"{what} needs {plan.text()}, but " + " and ".join(over) + "; ways out: " + "; ".join(ways))
