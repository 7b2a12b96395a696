"""LoRA recovery of a pruned model (the OWL paper's fine-tuning section): a short fine-tune of low-rank adapters on
calibration text, with the adapters kept *separate* (never merged), so the pruned weights and their zeros stay
exactly as they were. The recovered model is the pruned base plus the adapters' low-rank branch W + (α/r)·B·A.

Defaults are sized for a few minutes on a 2-core CPU with SmolLM2-135M; every one is a named constant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from pruner.model.anatomy import ExpertSlice, find_blocks, prunable_layers

#: Optimiser steps (one sequence each by default). ~1.5 s per step for SmolLM2 at 512 tokens on 2 cores.
RECOVER_DEFAULT_STEPS = 100
#: LoRA rank r and scaling numerator α (the update is (α / r)·B·A); r = 8, α = 16 is peft's common setting.
RECOVER_DEFAULT_RANK = 8
RECOVER_DEFAULT_ALPHA = 16
#: AdamW learning rate for the adapters; higher than long LoRA runs use, because the run is short.
RECOVER_DEFAULT_LR = 5e-4
#: Share of the steps over which the learning rate warms up linearly from 0 (then it decays linearly to 0).
RECOVER_WARMUP_FRACTION = 0.1
#: Training sequences: tokens per sequence and sequences per step.
RECOVER_DEFAULT_SEQLEN = 512
RECOVER_DEFAULT_BATCH = 1
#: Seed of the training windows, offset from the calibration seed so they are not the pruning calibration windows.
RECOVER_SEED_OFFSET = 1000


@dataclass(frozen=True)
class RecoverSpec:
    """One LoRA recovery of a stored run (``parent``: its key)."""

    parent: str
    steps: int = RECOVER_DEFAULT_STEPS
    rank: int = RECOVER_DEFAULT_RANK
    alpha: float = RECOVER_DEFAULT_ALPHA
    lr: float = RECOVER_DEFAULT_LR
    seqlen: int = RECOVER_DEFAULT_SEQLEN
    batch: int = RECOVER_DEFAULT_BATCH

    def __post_init__(self):
        for name in ("steps", "rank", "seqlen", "batch"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"LoRA recovery: {name} must be an integer ≥ 1; got {value!r}")
        for name in ("alpha", "lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"LoRA recovery: {name} must be a number > 0; got {value!r}")

    def identity(self) -> dict:
        return {"recover": asdict(self), "format": 1}

    def key(self) -> str:
        from pruner.store.formats import stable_hash

        return stable_hash(self.identity())

    def label(self) -> str:
        return f"LoRA r={self.rank}, {self.steps} steps"


def lora_target_names(model: nn.Module) -> list[str]:
    """The distinct last-name components of the prunable linears in the blocks (q_proj, …, down_proj): the layers
    that were pruned are the ones that get adapters. In a mixture-of-experts model the routed experts' matrices are
    slices of fused 3-D parameters, not linears peft can wrap: there the targets are the full names of the blocks'
    other prunable linears (attention, shared experts), and the routed experts get no adapter."""
    path, blocks = find_blocks(model)
    layers = [(i, name, layer) for i, block in enumerate(blocks) for name, layer in prunable_layers(block).items()]
    if not any(isinstance(layer, ExpertSlice) for _, _, layer in layers):
        return sorted({name.split(".")[-1] for _, name, _ in layers})
    return [f"{path}.{i}.{name}" for i, name, layer in layers if not isinstance(layer, ExpertSlice)]


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first RECOVER_WARMUP_FRACTION of the steps, then linear decay to 0 at ``total``."""
    warmup = max(1, round(total * RECOVER_WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def train_lora(model: nn.Module, tokens: torch.Tensor, spec: RecoverSpec, *, seed: int, device="cpu",
               progress: Callable[[int, int], None] | None = None,
               should_cancel: Callable[[], bool] | None = None):
    """Wrap ``model`` with LoRA adapters on its prunable linears and train them on ``tokens`` (steps × batch,
    seqlen) with the causal-LM loss. Returns (peft model, per-step losses). The base weights are frozen.

    The adapters' random initialisation (LoRA's A matrices) is drawn from ``seed``, not from whatever state the
    process's random generator is in, so one spec gives one result; the caller's generator state is left as it was.
    """
    from peft import LoraConfig, get_peft_model

    from pruner.engine.calibrate import Cancelled

    if tokens.shape[0] < spec.steps * spec.batch:
        raise ValueError(f"LoRA recovery needs {spec.steps * spec.batch} training sequences; got {tokens.shape[0]}")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
                        target_modules=lora_target_names(model), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    peft_model.to(device).train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    losses = []
    for step in range(spec.steps):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"LoRA recovery cancelled before step {step + 1} of {spec.steps}")
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, spec.steps, spec.lr)
        batch = tokens[step * spec.batch:(step + 1) * spec.batch].to(device)
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, spec.steps)
    peft_model.eval()
    return peft_model, losses
