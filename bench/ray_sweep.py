"""The same 4-cell sweep of SmolLM2 on the local executor and on a Ray cluster started here (issue 15).

Cells: {uniform, OWL} × {50%, 60%}, Wanda, the cpu calibration preset (seed 0), no evaluation; each executor starts
from an empty cache (the converted model linked in), so each computes the shared statistics once and then the four
cells. Ray runs on a head started by this script on 127.0.0.1 with all of this machine's CPUs; it is timed with
one task at a time using every CPU (the local executor's shape: the ratio is Ray's overhead) and with one CPU per
task (tasks side by side). Prints wall time, the ratio to the local executor, and the time from submission to the
first progress report.

    python -m bench.ray_sweep [--cells-cpus 2 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

import torch

from bench.common import git_rev, machine
from pruner.jobs.queue import JobStore
from pruner.jobs.ray_exec import LOCAL_RAY_ENV, start_local_head
from pruner.jobs.sweep import LocalExecutor, SweepRequest
from pruner.model.catalogue import ModelSpec
from pruner.specs import CalibSpec, PruneSpec
from pruner.store.files import default_data_dir
from pruner.store.layout import CacheLayout


def timed(executor, sweep, cache: Path) -> tuple[float, float, list]:
    """(wall seconds, seconds to the first progress report, final jobs)."""
    store = JobStore(cache / "jobs.sqlite")
    t0 = time.perf_counter()
    ids = executor.submit(store, sweep, cache)
    first = None
    while True:
        store.reap()
        jobs = [store.get(i) for i in ids]
        if first is None and any(j.done > 0 for j in jobs):
            first = time.perf_counter() - t0
        if all(j.state in ("done", "failed", "cancelled") for j in jobs):
            return time.perf_counter() - t0, first, jobs
        time.sleep(0.1)


def fresh_cache(root: Path, name: str) -> Path:
    cache = root / name
    (cache).mkdir()
    (cache / "models").symlink_to(CacheLayout.at(None).models.resolve())  # the converted model, not converted again
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells-cpus", nargs="+", type=int, default=[os.cpu_count() or 1, 1],
                    help="CPUs per Ray task, one Ray measurement each")
    args = ap.parse_args()
    os.environ.update(LOCAL_RAY_ENV)
    data_dir = os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
    base = PruneSpec(model=ModelSpec("smollm2-135m", device="cpu"), calib=CalibSpec.preset("cpu", data_dir=data_dir),
                     allocator="uniform", method="wanda", sparsity=0.5)
    sweep = SweepRequest(base, allocators=("uniform", "owl"), sparsities=(0.5, 0.6))
    print(f"# machine: {machine()}; commit {git_rev()}; torch threads in local workers {torch.get_num_threads()}")
    print(f"# sweep: {sweep.label()}; statistics once, then 4 cells; each executor from an empty cache")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wall, first, jobs = timed(LocalExecutor(), sweep, fresh_cache(root, "local"))
        assert all(j.state == "done" for j in jobs), [(j.id, j.state, j.error) for j in jobs]
        rows.append(("local (worker processes, one job at a time)", wall, first))
        from pruner.jobs.ray_exec import RayExecutor, RaySettings

        head, address = start_local_head(os.cpu_count() or 1)
        try:
            for cpus in args.cells_cpus:
                executor = RayExecutor(RaySettings(address, cpus_per_cell=cpus))
                wall, first, jobs = timed(executor, sweep, fresh_cache(root, f"ray-{cpus}"))
                assert all(j.state == "done" for j in jobs), [(j.id, j.state, j.error) for j in jobs]
                rows.append((f"Ray, {cpus} CPU(s) per task", wall, first))
        finally:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
    local = rows[0][1]
    print("| executor | wall time (s) | ÷ local | first progress after (s) |")
    print("|---|---|---|---|")
    for name, wall, first in rows:
        print(f"| {name} | {wall:.1f} | {wall / local:.2f} | {first:.1f} |")


if __name__ == "__main__":
    main()
