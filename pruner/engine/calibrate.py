"""The one blockwise calibration loop.

1. Capture what every decoder block is called with: the hidden states entering block 0 (one tensor per
   calibration mini-batch) and, for each block, its other positional and keyword arguments (attention masks,
   rotary ``position_embeddings``, ``position_ids``...). Per-block arguments matter: Gemma3 alternates sliding and
   full attention, so blocks get different masks and rotary tables. The capture runs the model's base (no
   ``lm_head``) with every block temporarily replaced by a recorder that passes the hidden states through, so no
   exception is needed to stop the forward pass.
2. Walk the blocks in order. Each block is moved to the compute device, run on every mini-batch with the
   observer's hooks attached (hooks are always removed in ``finally``), and the observer then finishes the block
   (computes statistics, or prunes it). During that pass a mixture-of-experts block computes its routed experts
   through per-expert slices (``pruner.model.anatomy.routed_through_slices``), so a hook on an expert's matrix sees only
   the tokens the router sent to it. If the observer changed the block's weights, the block runs again so that
   the next block sees the outputs of the modified block (the sequential protocol of Wanda and SparseGPT).
   The block then goes back to where it was, so only one block at a time needs to fit on the compute device.
3. Optionally (``BlockInputs``) the pass keeps the hidden states entering some blocks, and a later pass over the
   same tokens whose first blocks behave the same starts at one of them instead of block 0 (the allocation search
   refits a child that moved only later blocks of its parent this way: ``pruner.predictor.fitness``).

The calibration activations (every sample's hidden states between blocks, ``nsamples × seqlen × hidden`` floats)
live on the compute device by default; with ``offload=True`` they live in CPU memory and each mini-batch visits
the device only for its turn through a block (less device memory, one copy in and out per mini-batch and block;
the same values). On a CPU-only machine both are the same place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pruner.core.memory import return_freed_memory
from pruner.model.anatomy import find_blocks, prunable_layers, routed_through_slices, weight_matrix

#: Attributes some model families read from a block object in their outer loop; recorders carry them over.
_BLOCK_ATTRIBUTES = ("attention_type", "layer_idx", "is_sliding", "sliding_window", "layer_type")

ProgressFn = Callable[[int, int], None]  # (blocks done, blocks total)


class BlockObserver(Protocol):
    """What one pass of the loop does at each block."""

    def attach(self, index: int, block: nn.Module, layers: dict[str, nn.Module]) -> list[RemovableHandle]:
        """Register hooks on the block's layers before it sees the calibration batches; return their handles."""

    def finish(self, index: int, block: nn.Module, layers: dict[str, nn.Module]) -> bool:
        """Called once the block has seen every batch. Return True if the block's weights were changed."""

    #: Optional (default False): True when the observer reads only the layers' inputs and ``finish`` always
    #: changes the weights, so the block runs again and its first-pass outputs are never used. The loop then skips
    #: the matmul of the block's last-running layer in the first pass (see ``_run_block``).
    first_pass_outputs_unused: bool


class BlockStore(Protocol):
    """Where a decoder block's weights are between turns: ``fetch`` puts block ``index`` on the compute device
    before the loop runs it, ``release`` is called once the loop is done with it (also after an error)."""

    def fetch(self, index: int, block: nn.Module, device: torch.device) -> None: ...

    def release(self, index: int, block: nn.Module) -> None: ...


class ResidentBlocks:
    """Blocks that live in memory: moved to the compute device for their turn and back where they were after."""

    def __init__(self) -> None:
        self._home: dict[int, torch.device] = {}

    def fetch(self, index: int, block: nn.Module, device: torch.device) -> None:
        self._home[index] = _module_device(block)
        block.to(device)

    def release(self, index: int, block: nn.Module) -> None:
        block.to(self._home.pop(index))


@dataclass
class BlockInputs:
    """The hidden states entering some decoder blocks during one pass of ``run_blockwise`` (each mini-batch's
    tensor, where the pass keeps its activations). The loop replaces list slots and never writes into a tensor, so
    keeping them copies nothing; it only holds their memory. A later pass over the same tokens whose blocks before
    block b compute what they computed here (the same weights, or pruned to the same levels from the same inputs)
    can start at the latest kept block ≤ b, with exactly the inputs a pass from block 0 would give it.

    ``every``: the pass keeps the inputs of blocks 0, every, 2·every, …"""

    every: int
    kept: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"block inputs are kept every 1 or more blocks; got every = {self.every}")

    def wants(self, index: int) -> bool:
        return index % self.every == 0

    def start_for(self, first_changed: int) -> int:
        """The latest kept block ≤ ``first_changed`` (0: start from the beginning)."""
        return max((i for i in self.kept if i <= first_changed), default=0)

    def before(self, index: int) -> "BlockInputs":
        """A copy keeping only the inputs of blocks before ``index`` (the tensors are shared)."""
        return BlockInputs(self.every, {i: h for i, h in self.kept.items() if i < index})


class LayerNeverRan(ValueError):
    """A prunable layer's forward never ran during a calibration pass, so it has no activation statistics: its
    model reads the layer's weight directly (e.g. Mamba's ``dt_proj``) instead of calling the module, or the layer
    serves an input the causal LM is not given (the cross-attention of an encoder-decoder's decoder)."""

    def __init__(self, block: int, names: list[str]):
        super().__init__(f"block {block}: {', '.join(names)} never ran as a module during calibration (the model reads "
                         "its weight directly, or it serves an input a causal LM is not given, such as an encoder's "
                         "states), so there are no activations to calibrate it with; this architecture can be pruned "
                         "only by a method that needs no calibration data (magnitude)")


class Cancelled(Exception):
    """The caller asked the loop to stop (checked between blocks, never inside a forward pass)."""


#: What a recorder returns for the hidden states h, tried in this order until the model's own loop over its blocks
#: accepts it: transformers 5's decoder layers return h itself; older-style loops read ``outputs[0]`` (GPT-Neo,
#: OpenAI-GPT) or unpack a pair (CPM-Ant).
_RECORDER_OUTPUTS = (lambda h: h, lambda h: (h,), lambda h: (h, None))


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: records its call and passes the hidden states through (in the
    output form ``wrap`` gives, one of ``_RECORDER_OUTPUTS``)."""

    def __init__(self, index: int, original: nn.Module, store: dict, wrap=_RECORDER_OUTPUTS[0]):
        super().__init__()
        self.index = index
        self.store = store
        self.wrap = wrap
        for attr in _BLOCK_ATTRIBUTES:
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if self.index == 0:
            self.store["hidden"].append(hidden.detach().to(self.store["to"]))
        self.store["calls"].setdefault(self.index, (rest, kwargs))
        return self.wrap(hidden)


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def mini_batch_size(nsamples: int, requested: int) -> int:
    """Largest size ≤ ``requested`` dividing ``nsamples``: every mini-batch then has the same shape, so the
    per-block arguments captured from the first one (e.g. a (b, 1, T, T) mask) are valid for all."""
    return math.gcd(nsamples, max(1, requested))


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, tokens: torch.Tensor, device: torch.device, batch_size: int,
    activations_device: torch.device | None = None,
) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]]]:
    """Hidden states entering block 0, per mini-batch ((b, T, hidden) each, on ``activations_device``, default the
    compute ``device``), and each block's call arguments (positional after the hidden states, keyword) as recorded
    on the first mini-batch (on ``device``)."""
    _, blocks = find_blocks(model)
    base = model.base_model if hasattr(model, "base_model") else model
    originals = list(blocks)
    home = _module_device(model)
    for attempt, wrap in enumerate(_RECORDER_OUTPUTS):
        store: dict = {"hidden": [], "calls": {}, "to": activations_device or device}
        try:
            for j, block in enumerate(originals):
                blocks[j] = _Recorder(j, block, store, wrap)
            model.to(device)  # only the non-block modules are in the tree now: embeddings, final norm, lm_head
            for start in range(0, tokens.shape[0], batch_size):
                base(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
            break
        except (TypeError, ValueError, RuntimeError, IndexError):
            if attempt == len(_RECORDER_OUTPUTS) - 1:
                raise  # no output form the model's loop accepts: its own error says why
        finally:
            model.to(home)
            for j, block in enumerate(originals):
                blocks[j] = block
    missing = [j for j in range(len(originals)) if j not in store["calls"]]
    if missing:
        raise RuntimeError(f"blocks {missing} were never called during capture; the model skips decoder blocks")
    return store["hidden"], [store["calls"][j] for j in range(len(originals))]


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` (the same tensor when it is already there: no copy on a CPU-only machine)."""
    return x.to(device)


@torch.no_grad()
def _run_block(block: nn.Module, inputs: list[torch.Tensor], call: tuple[tuple, dict],
               device: torch.device) -> list[torch.Tensor]:
    """The block's outputs for every mini-batch, each computed on ``device`` and stored where its input was."""
    args, kwargs = call
    return [_on(_first_tensor(block(_on(x, device), *args, **kwargs)), x.device) for x in inputs]


@torch.no_grad()
def _run_block_in_place(block: nn.Module, hidden: list[torch.Tensor], call: tuple[tuple, dict],
                        device: torch.device) -> list[torch.Tensor]:
    """Like ``_run_block``, but each list slot is replaced by its output as soon as it is computed (the tensors
    themselves are not modified: a reference held elsewhere keeps seeing the input)."""
    args, kwargs = call
    for j, x in enumerate(hidden):
        hidden[j] = _on(_first_tensor(block(_on(x, device), *args, **kwargs)), x.device)
        del x
    return hidden


@torch.no_grad()
def _run_block_for_inputs(block: nn.Module, inputs: list[torch.Tensor], call: tuple[tuple, dict],
                          layers: dict[str, nn.Module], device: torch.device) -> None:
    """Run the block only so that the observer's hooks see every layer's inputs; its outputs are not returned.

    The last prunable layer to run in the block (found on the first mini-batch: the MLP's output projection in every
    supported family) feeds no other layer of the block, only the block's output, which this pass discards. From
    the second mini-batch on, that layer returns zeros of its output shape instead of computing its matmul (about a
    quarter of a Llama block's linear work); hooks still fire with its true input. Every layer's input, and so
    every method's state, is exactly what a full forward gives.
    """
    args, kwargs = call
    order: list[str] = []
    handles = [layer.register_forward_pre_hook(lambda module, a, name=name: order.append(name))
               for name, layer in layers.items()]
    try:
        block(_on(inputs[0], device), *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if len(inputs) == 1 or not order:
        return
    last = layers[order[-1]]
    out_features = weight_matrix(last).shape[0]
    last.forward = lambda x, *a, **k: x.new_zeros(*x.shape[:-1], out_features)  # instance attribute: hooks still run
    try:
        for x in inputs[1:]:
            block(_on(x, device), *args, **kwargs)
    finally:
        del last.forward


@torch.no_grad()
def run_blockwise(
    model: nn.Module,
    tokens: torch.Tensor,
    observer: BlockObserver,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    blocks: BlockStore | None = None,
    offload: bool = False,
    keep: BlockInputs | None = None,
    start: tuple[int, list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Walk the decoder blocks over the calibration ``tokens`` (nsamples, seqlen) with ``observer``; ``blocks``
    says where each block's weights come from and go (default: they live in memory, ``ResidentBlocks``; streamed
    from disk: ``pruner.model.streaming.StreamedBlocks``). ``offload``: keep the activations between blocks in CPU memory
    instead of on the compute device (see the module's docstring). ``keep``: the inputs of the blocks it wants are
    added to it. ``start`` = (b, inputs): begin at block b with these hidden states entering it (a ``BlockInputs``
    entry of an earlier pass over the same tokens; the observer sees blocks b, b+1, … only).

    Returns the hidden states leaving the last block, (nsamples, seqlen, hidden), on CPU.
    Raises ``Cancelled`` between blocks when ``should_cancel()`` becomes true.
    """
    device = torch.device(device)
    store = blocks if blocks is not None else ResidentBlocks()
    _, decoder_blocks = find_blocks(model)
    batch = mini_batch_size(tokens.shape[0], batch_size)
    hidden, calls = capture_block_inputs(model, tokens, device, batch,
                                         activations_device=torch.device("cpu") if offload else device)
    first = 0
    if start is not None:
        first, entering = start
        if not 0 <= first < len(decoder_blocks) or len(entering) != len(hidden):
            raise ValueError(f"a pass starts at a block 0 … {len(decoder_blocks) - 1} with one tensor per mini-batch "
                             f"({len(hidden)}); got block {first} with {len(entering)}")
        hidden = list(entering)  # the pass's own list: the kept one stays as it is
    if progress is not None:  # the inputs are captured: the phase's clock starts here (ETA from block times)
        progress(first, len(decoder_blocks))
    for i, block in enumerate(decoder_blocks):
        if i < first:
            continue
        if keep is not None and keep.wants(i):
            keep.kept[i] = list(hidden)
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled before block {i} of {len(decoder_blocks)}")
        store.fetch(i, block, device)
        try:
            layers = prunable_layers(block)
            handles: list[RemovableHandle] = []
            inputs_only = getattr(observer, "first_pass_outputs_unused", False)
            outputs = None
            try:
                handles = observer.attach(i, block, layers)
                with routed_through_slices(block):  # hooks on an expert's matrices see only its routed tokens
                    if inputs_only:
                        _run_block_for_inputs(block, hidden, calls[i], layers, device)
                    else:
                        outputs = _run_block(block, hidden, calls[i], device)
            finally:
                for handle in handles:
                    handle.remove()
            if observer.finish(i, block, layers) or outputs is None:
                del outputs  # the first pass's outputs, if kept, are stale now
                # each mini-batch's input is needed only for its own output: replaced in place, so the pass
                # holds one set of hidden states instead of two (nsamples × seqlen × hidden floats)
                outputs = _run_block_in_place(block, hidden, calls[i], device)
        finally:
            store.release(i, block)
        hidden = outputs
        return_freed_memory()
        if progress is not None:
            progress(i + 1, len(decoder_blocks))
    return torch.cat([h.cpu() for h in hidden])
