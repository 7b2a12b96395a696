"""bench/gpu_check.py stays runnable before an accelerator is lent: its dry run (every step, tiny shapes, CPU) passes
here, and its full run refuses in one line where there is no CUDA device."""

import subprocess
import sys

import pytest
import torch

from bench import gpu_check
from pruner.store.files import PROJECT_ROOT


def test_the_dry_run_passes_every_step(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    steps = {r.split("|")[1].strip(): r.split("|")[2].strip() for r in rows if not r.startswith("|---")}
    assert steps == {name: "pass" for name in ("statistics", "owl", "wanda", "sparsegpt", "wanda mask", "perplexity",
                                                "offload", "moe")}, out
    assert "8 of 8 steps did not fail" in out


def test_a_spent_budget_skips_the_remaining_steps_cleanly(capsys):
    assert gpu_check.main(["--dry-run", "--budget-s", "0"]) == 0  # nothing failed: everything was skipped
    out = capsys.readouterr().out
    assert out.count("skipped") >= 8 and "the budget of 0 s was spent" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the full run would start")
def test_without_cuda_the_full_run_refuses_in_one_line():
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check"], capture_output=True, text=True, cwd=PROJECT_ROOT,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == ("error: no CUDA device: this check runs on a GPU (use --dry-run "
                                                      "for the same steps on CPU)"), r.stderr
