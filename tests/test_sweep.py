"""Sweeps (issue 15): the grid's expansion, and the same sweep on the local executor and on a real Ray cluster
(a head started here on 127.0.0.1 with 2 CPUs), including a Ray worker killed in the middle of a cell."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pruner.jobs.queue import JobStore
from pruner.jobs.ray_exec import start_local_head
from pruner.jobs.sweep import LocalExecutor, SweepRequest, wait_for
from pruner.model.catalogue import ModelSpec
from pruner.specs import CalibSpec, PruneSpec

ROOT = Path(__file__).resolve().parents[1]
#: The head stops by itself after this long even if the test process dies first.
HEAD_LIFETIME_S = 900
WAIT_S = 300


def _base(folder, data_dir, **kw) -> PruneSpec:
    return PruneSpec(model=ModelSpec(folder, device="cpu"), calib=CalibSpec(nsamples=4, seqlen=64, data_dir=data_dir),
                     allocator="uniform", method="wanda", sparsity=0.5, **kw)


def test_sweep_expands_axes_and_shares_prerequisites(tiny_folder, data_dir, tmp_path):
    sweep = SweepRequest(_base(tiny_folder, data_dir), allocators=("uniform", "owl"), sparsities=(0.5, 0.6), seeds=2,
                         params={"lam": [0.04, 0.08]})
    specs = sweep.specs()
    # λ applies to OWL only: uniform has 2 sparsities × 2 seeds; OWL 2 × 2 × 2 λ
    assert len(specs) == 4 + 8 and len({s.key() for s in specs}) == 12
    assert sorted({s.allocator_params.get("lam") for s in specs if s.allocator == "owl"}) == [0.04, 0.08]
    assert all(s.allocator_params == {} for s in specs if s.allocator == "uniform")
    assert sorted({s.calib.seed for s in specs}) == [0, 1]
    # two calibration sets: statistics twice, each once, before the twelve cells
    jobs = sweep.jobs(tmp_path)
    assert [j.kind for j in jobs] == ["stats"] * 2 + ["prune"] * 12
    assert {j.spec.key() for j in jobs[:2]} == {s.stats_spec.key() for s in specs}
    # a learned allocator's allocation is a shared prerequisite too
    besa = SweepRequest(_base(tiny_folder, data_dir), allocators=("besa",), methods=("wanda", "magnitude"))
    assert [j.kind for j in besa.jobs(tmp_path)] == ["stats", "learn", "prune", "prune"]
    # so is a search, one per calibration seed, whatever the method (a Ray sweep runs each as one task)
    search = SweepRequest(_base(tiny_folder, data_dir), allocators=("search",), methods=("wanda", "sparsegpt"), seeds=2)
    assert [j.kind for j in search.jobs(tmp_path)] == ["stats"] * 2 + ["learn"] * 2 + ["prune"] * 4
    assert SweepRequest.from_dict(sweep.to_dict()).specs() == specs


def test_cancelling_a_sweeps_prerequisite_cancels_the_jobs_that_wait_for_it(tiny_folder, data_dir, tmp_path):
    """A cancelled learning job took its cells along: before, the first cell found no learned allocation and started
    the same learning itself, uncancelled. The dependency is by result (``Request.makes``/``needs``), so a prune
    queued by hand (another request on the same learned allocation) waits for the same learning."""
    from pruner.jobs.workflows import PruneRequest

    sweep = SweepRequest(_base(tiny_folder, data_dir), allocators=("uniform", "besa"), methods=("wanda", "magnitude"))
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = {(r.kind, getattr(getattr(r, "spec", None), "allocator", None) or getattr(r, "allocator", None),
            getattr(getattr(r, "spec", None), "method", None)): store.add(r.kind, r.to_dict(), r.label())
           for r in sweep.jobs(tmp_path)}
    stats, learn = ids[("stats", None, None)], ids[("learn", "besa", None)]
    besa_cells = sorted(i for (kind, a, _), i in ids.items() if kind == "prune" and a == "besa")
    by_hand = PruneRequest(dataclasses.replace(sweep.specs()[-1], sparsity=0.5, method="sparsegpt"))
    besa_cells.append(store.add(by_hand.kind, by_hand.to_dict(), by_hand.label()))
    assert len(besa_cells) == 3 and len(set(besa_cells)) == 3
    assert store.dependents(learn) == besa_cells
    assert store.claim(os.getpid()).id == stats  # the statistics run: a running job's dependents are found too
    assert store.dependents(stats) == sorted(j.id for j in store.list() if j.id != stats)
    store.cancel(learn)
    states = {j.id: j.state for j in store.list()}
    assert [states[i] for i in [learn, *besa_cells]] == ["cancelled"] * 4
    assert sorted(i for i, st in states.items() if st != "cancelled") == sorted(
        [stats, ids[("prune", "uniform", "wanda")], ids[("prune", "uniform", "magnitude")]])
    # the running statistics job: asked to stop, and its remaining dependents (the uniform cells) cancelled now
    assert store.dependents(learn) == []  # an ended job has none
    store.cancel(stats)
    assert store.get(stats).cancel_requested and store.get(stats).state == "running"
    assert [j.state for j in store.list() if j.id != stats] == ["cancelled"] * (len(states) - 1)


def test_a_whole_sweep_is_cancelled_by_its_range_of_ids(tiny_folder, data_dir, tmp_path, capsys):
    """`jobs cancel A-B` (the range the sweep printed) cancels every cell, one line each, without repeating the ones
    an earlier id already took along; a range reaching a job that does not exist cancels nothing and says which."""
    from pruner.jobs.workflows import PruneRequest
    from tests.test_cli import cli_in_process

    sweep = SweepRequest(_base(tiny_folder, data_dir), allocators=("uniform", "besa"), methods=("wanda",))
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = [store.add(r.kind, r.to_dict(), r.label()) for r in sweep.jobs(tmp_path)]
    extra = PruneRequest(dataclasses.replace(sweep.specs()[0], sparsity=0.4))  # no cell, but on the sweep's statistics
    other = store.add(extra.kind, extra.to_dict(), extra.label())
    first, last = ids[0], ids[-1]
    refused = cli_in_process(capsys, "jobs", "cancel", f"{first}-{other + 1}", cache=tmp_path, data_dir=None)
    assert refused.returncode == 2 and f"no job {other + 1} in" in refused.stderr
    assert "nothing was cancelled" in refused.stderr and {j.state for j in store.list()} == {"queued"}
    done = cli_in_process(capsys, "jobs", "cancel", f"{first}-{last}", cache=tmp_path, data_dir=None)
    assert done.returncode == 0, done.stderr
    assert [j.state for j in store.list() if j.id in ids] == ["cancelled"] * len(ids)
    assert store.get(other).state == "cancelled" and store.alive_workers() == []  # no worker was started for them
    lines = done.stdout.splitlines()
    assert [ln for ln in lines if ln.startswith("job ")] == [f"job {i}: cancelled" for i in ids]
    # the statistics job took the other job along (it waits for them); the cells were asked for by their own ids
    assert [ln for ln in lines if "cancelled with it" in ln] == [
        f"cancelled with it, as they wait for its result: job {other}"]
    for words, message in (([f"{last}-{first}"], "low end first"), (["x"], "whole numbers or ranges")):
        bad = cli_in_process(capsys, "jobs", "cancel", *words, cache=tmp_path, data_dir=None)
        assert bad.returncode == 2 and message in bad.stderr
    two = cli_in_process(capsys, "jobs", "wait", str(first), str(last), cache=tmp_path, data_dir=None)
    assert two.returncode == 2 and "jobs wait takes one job id; got 2" in two.stderr


@pytest.mark.parametrize("kw, message", [({"allocators": ("nope",)}, "allocators must be among"),
                                         ({"params": {"lambda": [0.1]}}, "no allocator or method declares"),
                                         ({"seeds": 0}, "seeds must be an integer ≥ 1"),
                                         ({"sparsities": (1.5,)}, "sparsity")])
def test_bad_sweep_is_refused_before_anything_is_queued(tiny_folder, data_dir, kw, message):
    with pytest.raises(ValueError, match=message):
        SweepRequest(_base(tiny_folder, data_dir), **kw)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local Ray head on 127.0.0.1: 2 CPUs, no dashboard, no usage stats; killed (with its workers) afterwards."""
    pytest.importorskip("ray", reason="Ray is an optional extra (requirements-dev.txt installs it)")
    proc, address = start_local_head(2, lifetime_s=HEAD_LIFETIME_S, temp_dir=tmp_path_factory.mktemp("ray"))
    yield address
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _weights(cache: Path, key: str) -> dict:
    return load_file(cache / "runs" / key / "model.safetensors")


def _runs(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "runs").iterdir())


def test_ray_sweep_gives_the_local_executors_runs(ray_head, tiny_folder, data_dir, tmp_path):
    # the CLI, on the Ray cluster (the cache folder is shared: the tasks find the driver's token in it)
    ray_cache = tmp_path / "ray"
    out = subprocess.run([sys.executable, "-m", "pruner", "sweep", "--model", tiny_folder, "--nsamples", "4",
                          "--seqlen", "64", "--data-dir", data_dir, "--cache-dir", str(ray_cache),
                          "--allocators", "uniform", "owl", "--sparsities", "0.5", "0.6", "--ray", ray_head],
                         cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on the ray executor" in out.stdout and out.stdout.count(" done ") >= 5  # statistics + 4 cells
    # the same sweep on the local executor (job table + worker process)
    local_cache = tmp_path / "local"
    store = JobStore(local_cache / "jobs.sqlite")
    sweep = SweepRequest(_base(tiny_folder, data_dir), allocators=("uniform", "owl"), sparsities=(0.5, 0.6))
    jobs = wait_for(store, LocalExecutor().submit(store, sweep, local_cache), poll_s=0.2)
    assert [j.state for j in jobs] == ["done"] * 5
    keys = [s.key() for s in sweep.specs()]
    assert _runs(ray_cache) == _runs(local_cache) == sorted(keys)
    for key in keys:
        ray_w, local_w = _weights(ray_cache, key), _weights(local_cache, key)
        assert ray_w.keys() == local_w.keys() and all(torch.equal(ray_w[n], local_w[n]) for n in ray_w)
    ray_jobs = JobStore(ray_cache / "jobs.sqlite").list()
    assert {j.executor for j in ray_jobs} == {"ray"} and all(j.remote and j.remote["pid"] for j in ray_jobs)
    assert all(j.result["executor"]["shared_cache"] for j in ray_jobs)


def test_killed_ray_worker_is_retried_and_leaves_no_partial_run(ray_head, tiny_folder, data_dir, tmp_path):
    from pruner.jobs.ray_exec import RayExecutor, RaySettings

    cache, node = tmp_path / "store", tmp_path / "node"
    store = JobStore(cache / "jobs.sqlite")
    # nodes without the shared cache: outputs come back through Ray and are unpacked into the store by the driver
    executor = RayExecutor(RaySettings(ray_head, shared_cache=False, node_cache=str(node)))
    sweep = SweepRequest(_base(tiny_folder, data_dir), allocators=("uniform", "owl", "er"), sparsities=(0.5,))
    ids = executor.submit(store, sweep, cache)
    store.cancel(ids[-1])  # cancel works on Ray too: the last cell never runs
    victim = ids[1]  # the first cell (after the statistics)
    end = time.monotonic() + WAIT_S
    while (store.get(victim).remote or {}).get("pid") is None:
        assert time.monotonic() < end and store.get(victim).state == "running", store.get(victim)
        time.sleep(0.05)
    killed = store.get(victim).remote["pid"]
    os.kill(killed, signal.SIGKILL)
    jobs = {j.id: j for j in wait_for(store, ids, poll_s=0.2)}
    lost = jobs[victim]
    assert jobs[ids[-1]].state == "cancelled", jobs[ids[-1]]
    others = [j for i, j in jobs.items() if i not in (victim, ids[-1])]
    assert all(j.state == "done" for j in others), [(j.id, j.state, j.error) for j in others]
    # retried on a fresh worker (max_retries 2), with the same result as the other path would give
    assert lost.state == "done" and lost.remote["attempt"] == 2 and lost.remote["pid"] != killed, lost
    done_runs = sorted(j.result["run"] for j in jobs.values() if j.kind == "prune" and j.state == "done")
    assert _runs(cache) == done_runs  # every run complete; no hidden temporary folder either
    for key in done_runs:
        assert (cache / "runs" / key / "manifest.json").is_file() and _weights(cache, key)
    assert not [p for p in (node / "runs").iterdir() if p.name.startswith(".")]


def test_prune_page_submits_its_grid_to_the_ray_cluster_named_in_the_sidebar(ray_head, tiny_folder, data_dir, tmp_path,
                                                                          monkeypatch):
    from tests.app.test_pages import go, tiny_app

    at = go(tiny_app(tmp_path, tiny_folder, data_dir, monkeypatch), "prune")
    at.sidebar.text_input(key="ray_address").input(ray_head).run()
    at.multiselect(key="grid_allocators").set_value(["uniform"]).run()
    at.multiselect(key="grid_sparsities").set_value([0.5]).run()
    at.checkbox(key="grid_ppl").uncheck().run()
    at.button(key="grid_go").click().run()
    assert not at.exception, at.exception
    assert any("Queued 1 prune job(s)" in s.value and "on the ray executor" in s.value for s in at.success)
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = sorted(j.id for j in store.list())
    assert [(j.kind, j.executor) for j in (store.get(i) for i in ids)][-1] == ("prune", "ray")
    # the cell runs like those of the CLI's Ray sweep (test above); here it is cancelled, through the driver
    for i in ids:
        store.cancel(i)
    jobs = wait_for(store, ids, poll_s=0.2)
    assert all(j.state == "cancelled" for j in jobs), [(j.id, j.state, j.error) for j in jobs]
    assert not (tmp_path / "runs").exists() or _runs(tmp_path) == []


def test_without_ray_the_ray_option_says_what_to_install(monkeypatch):
    from pruner.jobs.sweep import executor_for

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as on a machine without it
    assert executor_for(None).name == "local"
    with pytest.raises(ValueError, match=r"pip install -e '\.\[ray\]'"):
        executor_for("127.0.0.1:6379")


def test_stale_temporaries_are_matched_by_pid_and_host(tmp_path):
    """On a cache that several nodes share, a pid alone does not name a writer: a node clears only folders of its
    own dead writers, the driver only those of the lost attempt's pid on the lost attempt's host."""
    from pruner.jobs.ray_exec import lost_attempt, remove_stale_temporaries
    from pruner.store.files import atomic_dir, temporary_writer, writer_gone_here, writer_host

    here = writer_host()
    with atomic_dir(tmp_path / "runs" / "0123456789abcdef") as tmp:
        assert temporary_writer(tmp.name) == (os.getpid(), here)
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid
    names = {"live here": f".a.tmp-{os.getpid()}-abcdef12-{here}", "dead here": f".b.tmp-{dead}-abcdef12-{here}",
             "elsewhere": f".c.tmp-{dead}-abcdef12-other-node-7", "old format": f".d.tmp-{dead}-abcdef12"}
    for name in names.values():
        (tmp_path / "runs" / name).mkdir()
    removed = {p.name for p in remove_stale_temporaries(tmp_path, writer_gone_here)}
    assert removed == {names["dead here"], names["old format"]}
    removed = {p.name for p in remove_stale_temporaries(tmp_path, lost_attempt({"pid": dead, "host": "other-node-7"}))}
    assert removed == {names["elsewhere"]}
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"0123456789abcdef", names["live here"]}
