"""What a decoder block is made of: its prunable units, mixture-of-experts experts included, and every weight that
is not pruned, with the reason.

Prunable units are ``nn.Linear`` (and GPT-2's ``Conv1D``) modules and the matrices of routed experts. In
transformers 5 the routed experts of Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek-V3 and others are one module
holding fused 3-D parameters (``gate_up_proj`` of shape [E, 2·I, H] and ``down_proj`` [E, H, I]; GPT-OSS stores
them transposed, [E, H, 2·I] and [E, I, H], with gate and up interleaved). Such a module is recognised by the
layout attributes transformers' ``use_experts_implementation`` gives it (``is_transposed``, ``is_concatenated``,
``has_gate``, ``has_bias``). Each expert's matrices then become units of the block named like the per-expert
linears of older layouts, ``mlp.experts.3.gate_proj`` / ``up_proj`` / ``down_proj``: ``ExpertSlice`` modules that
own no parameter and whose ``weight`` is an (out, in) *view* of the fused parameter, so a pruned weight written
into it lands in the fused tensor in place (same storage; state dicts, ``save_pretrained`` and ``.to(device)`` see
only the fused parameter).

Calibration hooks on an expert's units must see only the tokens the router sends to that expert, and ``down_proj``
that expert's own intermediate activations. ``routed_through_slices(block)`` makes the block's experts compute
through their slices (the same arithmetic as transformers' eager loop over experts: gate and up, the family's own
``_apply_gate``, down, times the routing weight), so forward hooks on the slices fire with exactly those inputs.
Outside that context a model runs its own experts implementation.

Routers (``mlp.gate``, ``mlp.router``, Qwen2-MoE's ``shared_expert_gate``, Llama-4's ``feed_forward.router``,
DBRX's ``router.layer``) are never pruned: a path component in ``ROUTER_NAMES`` marks one, ``nn.Linear`` or not.
Shared experts are ordinary MLP linears. ``block_weights`` accounts for every parameter of a block; a 2-D or 3-D
weight that is neither a prunable unit nor a router is "not supported", and ``unsupported_weights`` lists them so
that a prune refuses rather than leave them dense silently.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

#: A path component that makes a module a router (never pruned): Mixtral/Qwen/OLMoE/DeepSeek ``mlp.gate``,
#: GPT-OSS/Llama-4/DBRX ``router``, Qwen2-MoE's scalar ``shared_expert_gate``.
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})

#: Attributes that transformers' ``use_experts_implementation`` sets on a fused experts module.
_FUSED_LAYOUT_ATTRIBUTES = ("is_transposed", "is_concatenated", "has_gate", "has_bias")

#: Roles of a block's parameters in ``block_weights``.
PRUNED, ROUTER, NORM, BIAS, VECTOR, UNSUPPORTED = "pruned", "router", "norm", "bias", "vector", "not supported"


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers experts module that keeps its experts in fused 3-D parameters."""
    if not all(hasattr(module, a) for a in _FUSED_LAYOUT_ATTRIBUTES):
        return False
    main = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(main, torch.Tensor) and isinstance(down, torch.Tensor) and main.dim() == down.dim() == 3


class ExpertSlice(nn.Module):
    """One matrix of one routed expert: an (out, in) view of a fused 3-D parameter of ``owner`` (no parameter of
    its own). ``part`` is 'gate', 'up' (halves of ``gate_up_proj``; just ``up_proj`` when the experts have no gate)
    or 'down'. ``forward(x)`` is ``x @ weightᵀ + bias`` for x of shape (tokens, in)."""

    def __init__(self, owner: nn.Module, expert: int, part: str):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner is this module's parent
        self.expert = expert
        self.part = part

    @property
    def parameter_name(self) -> str:
        """The owner's fused parameter this slice is part of: 'gate_up_proj', 'up_proj' or 'down_proj'."""
        if self.part == "down":
            return "down_proj"
        return "gate_up_proj" if self._owner.has_gate else "up_proj"

    def fused_parameter(self) -> torch.Tensor:
        return getattr(self._owner, self.parameter_name)

    def view_of(self, full: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """This slice's part of ``full``, a tensor shaped like the fused parameter ((out, in) view; writes go into
        ``full``), or with ``bias`` like the fused bias ((out,) view)."""
        owner = self._owner
        t = full[self.expert]  # ([2I|I|H], [H|I]), or transposed; a bias: ([2I|I|H],)
        if self.part != "down" and owner.has_gate:
            along = -1 if owner.is_transposed or bias else 0  # the axis holding gate and up
            half = t.shape[along] // 2
            first = self.part == "gate"
            if owner.is_concatenated:
                index = slice(0, half) if first else slice(half, 2 * half)
            else:  # interleaved: gate0, up0, gate1, up1, ...
                index = slice(0, None, 2) if first else slice(1, None, 2)
            t = t[..., index] if along == -1 else t[index]
        return t.T if owner.is_transposed and not bias else t

    @property
    def weight(self) -> torch.Tensor:
        """(out_features, in_features) view of the fused parameter (writes go into it)."""
        return self.view_of(self.fused_parameter())

    @property
    def bias(self) -> torch.Tensor | None:
        if not self._owner.has_bias:
            return None
        return self.view_of(getattr(self._owner, self.parameter_name + "_bias"), bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"expert={self.expert}, part={self.part}, out_features={out_f}, in_features={in_f} (fused view)"


class _ExpertUnits(nn.Module):
    """The slices of one expert, registered under the experts module as ``<e>`` (``<e>.gate_proj`` ...)."""

    def __init__(self, owner: nn.Module, expert: int):
        super().__init__()
        if owner.has_gate:
            self.gate_proj = ExpertSlice(owner, expert, "gate")
        self.up_proj = ExpertSlice(owner, expert, "up")
        self.down_proj = ExpertSlice(owner, expert, "down")


def num_experts(module: nn.Module) -> int:
    return int(getattr(module, "down_proj").shape[0])


def attach_expert_slices(block: nn.Module) -> None:
    """Give every fused experts module of ``block`` its per-expert slices (once; they hold no parameter, so the
    state dict is unchanged)."""
    for module in list(block.modules()):
        if is_fused_experts(module) and "0" not in module._modules:
            for e in range(num_experts(module)):
                module.add_module(str(e), _ExpertUnits(module, e))


def _sliced_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    *args, **kwargs) -> torch.Tensor:
    """Experts forward through the per-expert slices: hidden_states (tokens, H), top_k_index and top_k_weights
    (tokens, k) as the router computed them. Each expert sees only its routed tokens, as in transformers' eager
    loop; the routing weight multiplies the expert's output."""
    out = torch.zeros_like(hidden_states)
    for e in range(num_experts(self)):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        units = self._modules[str(e)]
        x = hidden_states[token]
        if self.has_gate:
            gate, up = units.gate_proj(x), units.up_proj(x)
            joint = torch.cat([gate, up], -1) if self.is_concatenated else torch.stack([gate, up], -1).flatten(-2)
            h = self._apply_gate(joint)
        else:
            h = self.act_fn(units.up_proj(x))
        y = units.down_proj(h)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


@contextmanager
def routed_through_slices(block: nn.Module):
    """Within the context, the block's fused experts compute through their slices, so forward hooks on the slices
    see each expert's routed tokens (and ``down_proj`` its own intermediate activations)."""
    attach_expert_slices(block)
    fused = [m for m in block.modules() if is_fused_experts(m)]
    for m in fused:
        m.forward = types.MethodType(_sliced_forward, m)  # instance attribute: the class's forward is untouched
    try:
        yield fused
    finally:
        for m in fused:
            m.__dict__.pop("forward", None)


def is_router(name: str) -> bool:
    """True when a module path inside a block names a router (a component in ``ROUTER_NAMES``)."""
    return any(part in ROUTER_NAMES for part in name.split("."))


def prunable_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Name → module for every prunable unit of a block, in module order: ``nn.Linear`` and GPT-2's ``Conv1D``
    modules that are not routers, and each routed expert's matrices (``ExpertSlice``; attached on first use)."""
    attach_expert_slices(block)
    kinds = (nn.Linear, _conv1d_class(), ExpertSlice)
    return {name: m for name, m in block.named_modules() if isinstance(m, kinds) and not is_router(name)}


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a (out_features, in_features) view (Conv1D stores it transposed; an expert slice is a
    view of its fused parameter)."""
    return layer.weight.T if isinstance(layer, _conv1d_class()) else layer.weight


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features)."""
    out_f, in_f = weight_matrix(layer).shape
    return int(out_f), int(in_f)


def parameter_overrides(layers: dict[str, nn.Module], matrices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters for ``torch.func.functional_call`` on a block in which each named layer's weight is the given
    (out, in) matrix (gradients flow to the matrices): ``<name>.weight`` for a linear (transposed back for Conv1D),
    and for routed experts the fused parameter, rebuilt from its slices' matrices (every slice of it must be
    given)."""
    out: dict[str, torch.Tensor] = {}
    for name, matrix in matrices.items():
        layer = layers[name]
        if isinstance(layer, ExpertSlice):
            path = f"{name.rsplit('.', 2)[0]}.{layer.parameter_name}"  # e.g. mlp.experts.gate_up_proj
            if path not in out:
                out[path] = torch.zeros_like(layer.fused_parameter(), dtype=matrix.dtype)
            layer.view_of(out[path]).copy_(matrix)  # autograd records the write into the view
        else:
            out[f"{name}.weight"] = matrix if weight_matrix(layer) is layer.weight else matrix.T
    return out


def is_expert_unit(name: str) -> bool:
    """True for the name of a routed expert's slice, e.g. ``mlp.experts.3.down_proj``."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-2].isdigit() and parts[-3] == "experts"


def expert_index(name: str) -> int | None:
    """3 for ``mlp.experts.3.down_proj``; None for a layer that is not a routed expert's."""
    return int(name.split(".")[-2]) if is_expert_unit(name) else None


def expert_kind(name: str) -> str:
    """The layer's name with a routed expert's index replaced by ``*`` (``mlp.experts.*.down_proj``)."""
    if not is_expert_unit(name):
        return name
    parts = name.split(".")
    return ".".join(parts[:-2] + ["*", parts[-1]])


def layer_kinds(names) -> list[str]:
    """The distinct ``expert_kind`` of layer names, in order of first appearance: every routed expert's matrix of one
    kind counts once."""
    return list(dict.fromkeys(expert_kind(n) for n in names))


def not_pruned_text(entry: dict) -> str:
    """One line for a ``weights_summary`` entry: 'not pruned: <name> (<n> weights in <b> blocks): <reason>'."""
    return f"not pruned: {entry['name']} ({entry['numel']:,} weights in {entry['blocks']} blocks): {entry['reason']}"


@dataclass(frozen=True)
class BlockWeight:
    """One parameter of a decoder block and what the tool does with it."""

    name: str  # parameter name inside the block, e.g. "mlp.experts.gate_up_proj"
    shape: tuple[int, ...]
    role: str  # PRUNED, ROUTER, NORM, BIAS, VECTOR or UNSUPPORTED
    reason: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def block_weights(block: nn.Module) -> list[BlockWeight]:
    """Every parameter of ``block`` with its role: pruned (a prunable unit's weight, or a fused experts tensor that
    is pruned through its slices), router, norm, bias, vector (other 1-D parameters, e.g. attention sinks) or
    not supported (any other 2-D or 3-D weight)."""
    layers = prunable_layers(block)
    pruned_ids = {id(m.weight) for m in layers.values() if not isinstance(m, ExpertSlice)}
    for m in block.modules():
        if is_fused_experts(m):
            pruned_ids.add(id(m.down_proj))
            pruned_ids.add(id(m.gate_up_proj if m.has_gate else m.up_proj))
    owners = {}
    for mod_name, module in block.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    out = []
    for name, p in block.named_parameters():
        owner = owners.get(name)
        owner_type = type(owner).__name__
        shape = tuple(int(d) for d in p.shape)
        last = name.split(".")[-1]
        if id(p) in pruned_ids:
            what = "routed experts, pruned per expert" if p.dim() == 3 else "pruned"
            out.append(BlockWeight(name, shape, PRUNED, what))
        elif is_router(name.rsplit(".", 1)[0] if "." in name else ""):
            out.append(BlockWeight(name, shape, ROUTER, "router: by design never pruned (it picks the experts)"))
        elif "bias" in last:
            out.append(BlockWeight(name, shape, BIAS, "bias: never pruned"))
        elif p.dim() <= 1 and "norm" in owner_type.lower():
            out.append(BlockWeight(name, shape, NORM, "normalisation scale: never pruned"))
        elif p.dim() <= 1:
            out.append(BlockWeight(name, shape, VECTOR, f"1-D parameter of {owner_type}: not a matrix, never pruned"))
        else:
            out.append(BlockWeight(name, shape, UNSUPPORTED,
                                   f"not supported: a {p.dim()}-D weight of {owner_type} that the tool cannot prune"))
    return out


def unsupported_weights(blocks) -> list[str]:
    """Names (``<block index>.<parameter>``) of every block weight the tool cannot prune, over all blocks."""
    return [f"{i}.{w.name}" for i, block in enumerate(blocks) for w in block_weights(block) if w.role == UNSUPPORTED]


def unsupported_message(names: list[str], architecture: str) -> str:
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return (f"{architecture} has decoder-block weights this tool cannot prune ({len(names)}): {shown}. Pruning "
            "would leave them dense while reporting the target as reached; pass --leave-unsupported-dense "
            "(PruneSpec(leave_unsupported_dense=True)) to prune the rest and record them in the manifest")


def weights_summary(blocks) -> dict:
    """The not-pruned weights of all blocks, by name inside a block: role, reason, blocks holding it and numel;
    plus parameter counts per role. For the model summary and the manifest."""
    by_name: dict[str, dict] = {}
    per_role: dict[str, int] = {}
    for block in blocks:
        for w in block_weights(block):
            per_role[w.role] = per_role.get(w.role, 0) + w.numel
            if w.role == PRUNED:
                continue
            entry = by_name.setdefault(w.name, {"name": w.name, "role": w.role, "reason": w.reason, "blocks": 0,
                                                "numel": 0})
            entry["blocks"] += 1
            entry["numel"] += w.numel
    return {"not_pruned": list(by_name.values()), "parameters_by_role": per_role}


def block_zero_count(block: nn.Module) -> tuple[int, int]:
    """(zeros, numel) over every parameter of ``block`` (the honest denominator of achieved sparsity)."""
    zeros = numel = 0
    for p in block.parameters():
        zeros += int((p == 0).sum())
        numel += p.numel()
    return zeros, numel


def experts_layout(blocks) -> dict | None:
    """Per block: how many routed experts it has (0 for a dense MLP); None when no block has experts."""
    counts = []
    for block in blocks:
        attach_expert_slices(block)
        counts.append(sum(num_experts(m) for m in block.modules() if is_fused_experts(m)))
    return {"experts_per_block": counts} if any(counts) else None


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
