"""Shared set-up for benchmark scripts: machine description and the bundled model's statistics."""

import os
import platform
import subprocess

import torch


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform knows)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; {mem:.0f} GiB RAM; {gpu}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def plain_forward(model, tokens, batch):
    """The reference cost: the whole causal LM over ``tokens`` in mini-batches, under no_grad."""
    with torch.no_grad():
        for i in range(0, len(tokens), batch):
            model(input_ids=tokens[i : i + batch], use_cache=False)


def forward_baseline(preset: str, batch_size: int = 4):
    """Load SmolLM2 and its calibration tokens, and time one plain forward over them (after a warm-up).

    Returns (loaded model, CalibSpec, tokens (nsamples, seqlen), forward seconds).
    """
    import time

    from pruner.data import calibration_tokens
    from pruner.model.catalogue import ModelSpec
    from pruner.model.loading import load_model
    from pruner.specs import CalibSpec
    from pruner.store.files import default_data_dir

    lm = load_model(ModelSpec("smollm2-135m"))
    calib = CalibSpec.preset(preset, data_dir=str(default_data_dir()))
    tokens = calibration_tokens(lm.tokenizer, calib)
    plain_forward(lm.model, tokens[:batch_size], batch_size)
    t0 = time.perf_counter()
    plain_forward(lm.model, tokens, batch_size)
    return lm, calib, tokens, time.perf_counter() - t0
