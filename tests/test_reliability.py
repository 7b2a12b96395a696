"""Faults that made the tool lie rather than crash: a final job state overwritten, the CLI ignoring
$PRUNER_CACHE_DIR, an evaluation window longer than the model's context stored as a metric."""

import json
import os
import subprocess
import sys

import pytest

from pruner.jobs import JobStore, submit
from pruner.specs import PruneSpec
from pruner.workflows import PruneRequest
from tests.conftest import copy_of_tiny_run


def test_a_final_job_state_is_final(tmp_path):
    """A worker stopped (SIGSTOP) long enough to be reaped as dead reports 'done' when it resumes: the table keeps
    the 'failed' it showed, with its cause."""
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = submit(store, PruneRequest(PruneSpec()), start_worker=False)
    store.hand_to([job_id], os.getpid())
    store.finish(job_id, "failed", error="worker process 1 stopped responding")
    store.finish(job_id, "done", result={"folder": "x"})
    job = store.get(job_id)
    assert job.state == "failed" and "stopped responding" in job.error
    with pytest.raises(ValueError, match="final state must be one of"):
        store.finish(job_id, "running")


def test_the_cli_reads_the_cache_folder_from_the_environment(tmp_path):
    cache = tmp_path / "my-cache"
    (cache / "runs").mkdir(parents=True)
    env = {**os.environ, "PRUNER_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-m", "pruner", "cache"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(cache) in out.stdout
    flag = subprocess.run([sys.executable, "-m", "pruner", "cache", "--cache-dir", str(tmp_path / "other")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert str(tmp_path / "other") in flag.stdout  # the flag wins over the environment


def test_an_evaluation_window_longer_than_the_context_is_refused_and_nothing_is_stored(tiny_run, data_dir,
                                                                                         tmp_path):
    cache, run = copy_of_tiny_run(tiny_run, tmp_path / "cache")
    before = json.loads((run / "manifest.json").read_text())["metrics"]
    context = json.loads((run / "config.json").read_text())["max_position_embeddings"]
    for stream in ([], ["--stream"]):
        out = subprocess.run([sys.executable, "-m", "pruner", "eval", "--run", run.name, "--ppl", "--max-chunks", "1",
                              "--eval-seqlen", str(context + 1), "--cache-dir", str(cache), "--data-dir", data_dir]
                             + stream, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        assert f"longer than the model's context of {context} tokens" in out.stderr
        assert "Traceback" not in out.stderr
    assert json.loads((run / "manifest.json").read_text())["metrics"] == before
