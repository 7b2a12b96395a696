"""Shared set-up for benchmark scripts: machine description and the bundled model's statistics."""

import os
import platform
import subprocess

import torch


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; {mem:.0f} GiB RAM; {gpu}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"
