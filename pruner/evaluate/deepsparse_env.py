"""DeepSparse's own virtual environment: DeepSparse 1.8.0 needs numpy < 2 and onnx < 1.15 (and CPython ≤ 3.11,
x86-64 Linux), so it lives in ``.venv-deepsparse`` and is driven through ``speed_worker.py`` in a subprocess.
``deepsparse_status`` says whether it can run here and why not; ``ensure_deepsparse_env`` builds it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from pruner.store.files import PROJECT_ROOT

#: The versions that work together (see DESIGN.md): 1.9.0 is an end-of-life stub that refuses to install, and with
#: numpy 2 DeepSparse 1.8.0 returns wrong logits.
DEEPSPARSE_REQUIREMENTS = ("deepsparse==1.8.0", "onnxruntime", "numpy<2", "onnx<1.15")
#: DeepSparse 1.8.0 publishes wheels for CPython 3.8 to 3.11 only.
DEEPSPARSE_PYTHONS = ((3, 8), (3, 11))
#: The worker script both environments run (JSON in, JSON out).
WORKER = Path(__file__).with_name("speed_worker.py")


def last_json(stdout: str) -> dict:
    """The worker's answer: the last line of stdout that parses as JSON (DeepSparse prints a banner)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    raise RuntimeError(f"the speed worker printed no JSON answer; its output ended with: {stdout[-500:]!r}")


def worker_env() -> dict:
    """The environment a worker subprocess runs in: no PYTHONPATH of ours, DeepSparse analytics off."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["NM_DISABLE_ANALYTICS"] = "1"
    return env



def deepsparse_env_dir() -> Path:
    return Path(os.environ.get("PRUNER_DEEPSPARSE_ENV") or PROJECT_ROOT / ".venv-deepsparse")


def _env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _find_base_python() -> str | None:
    """A CPython 3.8–3.11 to build the DeepSparse environment with (this one if it qualifies)."""
    lo, hi = DEEPSPARSE_PYTHONS
    if lo <= sys.version_info[:2] <= hi:
        return sys.executable
    for minor in range(hi[1], lo[1] - 1, -1):
        found = shutil.which(f"python3.{minor}")
        if found:
            return found
    return None


def platform_problem() -> str | None:
    """Why DeepSparse cannot run on this machine at all (None if it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"DeepSparse runs only on x86-64 CPUs; this machine is {platform.machine()}"
    if sys.platform != "linux":
        return f"DeepSparse runs only on Linux; this is {sys.platform}"
    from pruner.evaluate.speed_worker import cpu_info  # the worker's own CPU probe (it cannot import pruner)

    if "avx2" not in cpu_info()["flags"]:
        return "DeepSparse needs a CPU with AVX2; this CPU does not report it"
    if _find_base_python() is None:
        lo, hi = DEEPSPARSE_PYTHONS
        return (f"DeepSparse 1.8.0 needs CPython {lo[0]}.{lo[1]}–{hi[0]}.{hi[1]}; this is "
                f"{platform.python_version()} and no python3.{hi[1]}…3.{lo[1]} is on PATH")
    return None


def deepsparse_status() -> dict:
    """{"available": bool, "reason": why not (or None), "python": the environment's Python}."""
    problem = platform_problem()
    if problem:
        return {"available": False, "reason": problem, "python": None}
    python = _env_python(deepsparse_env_dir())
    if not python.exists():
        return {"available": False, "python": None,
                "reason": f"the DeepSparse environment {deepsparse_env_dir()} does not exist yet; build it with "
                          f"`make deepsparse` or `python -m pruner deepsparse-env`"}
    probe = subprocess.run([str(python), str(WORKER)], input=json.dumps({"probe": True}), capture_output=True,
                           text=True, env=worker_env())
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"available": False, "python": str(python),
                "reason": f"DeepSparse does not import in {deepsparse_env_dir()}: {tail[0]}"}
    return {"available": True, "reason": None, "python": str(python), **last_json(probe.stdout)}


def ensure_deepsparse_env(log: Callable[[str], None] = print) -> Path:
    """Create the DeepSparse virtual environment if missing (venv + pip, streamed to ``log``); returns its Python.

    Raises RuntimeError with the cause when the platform cannot run DeepSparse or pip fails; a failed install
    removes the half-built environment.
    """
    problem = platform_problem()
    if problem:
        raise RuntimeError(problem)
    env = deepsparse_env_dir()
    python = _env_python(env)
    if python.exists() and deepsparse_status()["available"]:
        log(f"DeepSparse environment ready: {env}")
        return python
    base = _find_base_python()
    log(f"creating {env} with {base}")
    shutil.rmtree(env, ignore_errors=True)
    steps = [[base, "-m", "venv", str(env)],
             [str(python), "-m", "pip", "install", "--disable-pip-version-check", *DEEPSPARSE_REQUIREMENTS]]
    try:
        for cmd in steps:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                if line.strip() and "is ignored: it is neither a file nor a directory" not in line:
                    log(line.rstrip())
            if proc.wait() != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
        status = deepsparse_status()
        if not status["available"]:
            raise RuntimeError(status["reason"])
    except BaseException:
        shutil.rmtree(env, ignore_errors=True)
        raise
    log(f"DeepSparse {status.get('deepsparse')} ready in {env}")
    return python

