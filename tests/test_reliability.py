"""Faults that made the tool lie rather than crash: a final job state overwritten, the CLI ignoring
$PRUNER_CACHE_DIR, an evaluation window longer than the model's context stored as a metric."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pruner.jobs.queue import JobStore, submit
from pruner.jobs.workflows import PruneRequest
from pruner.specs import PruneSpec
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


def _stats_folder(cache):
    (folder,) = (cache / "stats").iterdir()
    return folder


def _damage(folder, fault, other_stats_folder=None):
    import shutil

    npz = folder / "stats.npz"
    if fault == "truncated":
        npz.write_bytes(npz.read_bytes()[:1000])
    elif fault == "byte-flipped":
        data = bytearray(npz.read_bytes())
        data[len(data) // 2] ^= 0xFF
        npz.write_bytes(bytes(data))
    else:  # another model's statistics copied under this key
        shutil.rmtree(folder)
        shutil.copytree(other_stats_folder, folder)


def test_corrupt_or_foreign_statistics_are_named_listed_as_stale_and_never_used(tiny_run, smollm2, data_dir,
                                                                                tmp_path):
    """The session's tiny run cached its statistics; they are truncated, byte-flipped, or replaced by another
    model's (a 2-block Llama's, saved under the 4-block tiny model's key): each is refused by name, listed by
    `cache --stale`, and once removed computed again."""
    import transformers as tf

    from pruner.engine import artifacts
    from pruner.engine.stats import CorruptStatistics
    from pruner.model.catalogue import ModelSpec
    from pruner.runs.manifest import read_run
    from pruner.specs import CalibSpec, StatsSpec
    from pruner.store.layout import CacheLayout

    other, other_model = tmp_path / "other", tmp_path / "two-block-llama"
    torch.manual_seed(1)
    tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32,
                                                       intermediate_size=48, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2)
                                        ).save_pretrained(other_model)
    smollm2.tokenizer.save_pretrained(other_model)
    assert artifacts.get_stats(StatsSpec(ModelSpec(str(other_model)), CalibSpec(nsamples=1, seqlen=16,
                                                                             data_dir=data_dir)), other).n_blocks == 2
    for fault in ("truncated", "byte-flipped", "foreign"):
        cache, run = copy_of_tiny_run(tiny_run, tmp_path / fault)
        spec = StatsSpec(ModelSpec(**{k: v for k, v in read_run(run).raw["spec"]["model"].items()
                                      if k in ("name", "dtype", "device")} | {"name": _model_path(run)}),
                         CalibSpec(**_calib(run), data_dir=data_dir))
        folder = _stats_folder(cache)
        assert folder.name == spec.key()
        _damage(folder, fault, _stats_folder(other))
        with pytest.raises(CorruptStatistics, match=f"cached statistics {folder} cannot be used"):
            artifacts.load_cached_stats(spec, cache)
        layout = CacheLayout.at(cache)
        assert layout.stale_reason("stats", folder).startswith("corrupt: "), fault
        layout.remove([folder])
        assert artifacts.get_stats(spec, cache, save=False).n_blocks == 4  # computed again, from the tiny model


def _model_path(run):
    return json.loads((run / "manifest.json").read_text())["spec"]["model"]["path"]


def _calib(run):
    calib = json.loads((run / "manifest.json").read_text())["spec"]["calib"]
    return {k: calib[k] for k in ("nsamples", "seqlen", "seed")}


def test_the_cli_names_corrupt_statistics_in_one_line(tiny_run, data_dir, tmp_path):
    cache, run = copy_of_tiny_run(tiny_run, tmp_path / "cache")
    folder = _stats_folder(cache)
    _damage(folder, "truncated")
    calib = _calib(run)
    out = subprocess.run([sys.executable, "-m", "pruner", "allocate", "--model", _model_path(run), "--allocator", "owl",
                          "--sparsity", "0.5", "--nsamples", str(calib["nsamples"]), "--seqlen", str(calib["seqlen"]),
                          "--data-dir", data_dir, "--cache-dir", str(cache), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    # a corrupt cache entry is the environment's fault, not the user's input: its own exit code
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert f"cached statistics {folder} cannot be used" in out.stderr and f"cache --remove {folder.name}" in out.stderr


def _sigint_as_in_a_terminal():
    """SIGINT at its default in the child, as a command typed in a terminal has it: a suite started in the background
    by a non-interactive shell (``.ci/run &``) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    handler, so the Ctrl-C case would exit 0 having ignored the signal, as a shell's background job should."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum,code,word", [(2, 130, "interrupted"), (15, 143, "terminated")])
def test_a_signal_mid_prune_leaves_no_temporary_folder_and_no_traceback(smollm2, data_dir, tmp_path, signum, code,
                                                                        word):
    """Ctrl-C (SIGINT) or SIGTERM while the bundled model's run folder is being written: exit 130 / 143 with one
    line, no traceback, and nothing half-written left in the cache."""
    import time

    from tests.conftest import share_project_models

    import shutil

    cache = share_project_models(tmp_path / "cache")
    runs = cache / "runs"
    # the run folder is written in about half a second: on a busy machine the process may finish before the signal
    # lands (exit 0, a complete run); then the cache is emptied and the race run again, at most three times
    for _attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "pruner", "prune", "--allocator", "uniform", "--method",
                                 "wanda", "--sparsity", "0.5", "--preset", "tiny", "--data-dir", data_dir,
                                 "--cache-dir", str(cache), "--device", "cpu"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_in_a_terminal)
        deadline = time.time() + 240
        while time.time() < deadline and not (runs.is_dir() and any(p.name.startswith(".") for p in runs.iterdir())):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
        shutil.rmtree(runs)
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"{word}: nothing half-written")
    assert list(runs.iterdir()) == []


def _broken_folders(tiny_folder, root):
    """A corrupt config.json, a weight file cut to 1000 bytes or to half, and no weight file at all."""
    import shutil

    out = {}
    for fault in ("corrupt config", "1000 bytes", "half", "no weights"):
        folder = root / fault.replace(" ", "-")
        shutil.copytree(tiny_folder, folder)
        weights = folder / "model.safetensors"
        if fault == "corrupt config":
            (folder / "config.json").write_text('{"model_type": "llama", "hidden')
        elif fault == "1000 bytes":
            weights.write_bytes(weights.read_bytes()[:1000])
        elif fault == "half":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        else:
            weights.unlink()
        out[fault] = folder
    return out


def test_broken_model_folders_are_named_in_one_line(tiny_folder, data_dir, tmp_path, capsys):
    """Each broken folder through allocate, a streamed prune and eval, in this process (``pruner.cli.main``: the
    command's code without a Python start-up per case); one of them also as a real subprocess below."""
    from pruner.cli import main

    cache = tmp_path / "cache"
    common = ["--preset", "tiny", "--data-dir", data_dir, "--cache-dir", str(cache), "--device", "cpu"]
    commands = {"allocate": ["allocate", "--allocator", "owl", "--sparsity", "0.5"],
                "prune --stream": ["prune", "--allocator", "uniform", "--sparsity", "0.5", "--stream"],
                "eval": ["eval", "--ppl", "--max-chunks", "1"]}
    for fault, folder in _broken_folders(tiny_folder, tmp_path).items():
        for name, args in commands.items():
            if name == "eval" and fault not in ("corrupt config", "half"):
                continue  # the same loader as allocate
            capsys.readouterr()
            code = main([*args, "--model", str(folder), *common])
            err = capsys.readouterr().err
            lines = [l for l in err.strip().splitlines() if "it/s]" not in l]
            assert code == 2 and "Traceback" not in err, (fault, name, err[-2000:])
            assert lines[-1].startswith("error: ") and str(folder) in lines[-1], (fault, name, lines[-1])
    folder = _broken_folders(tiny_folder, tmp_path / "again")["half"]
    out = subprocess.run([sys.executable, "-m", "pruner", *commands["allocate"], "--model", str(folder), *common],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and str(folder) in out.stderr, out.stderr[-2000:]
    for kind in ("stats", "runs"):  # nothing cached or half-written
        assert not (cache / kind).exists() or not any((cache / kind).iterdir()), kind


def test_two_identical_prunes_at_once_do_the_work_once(smollm2, data_dir, tmp_path):
    """Two CLI prunes of one spec started together: one prunes, the other waits for its lock and then takes the
    stored run (it reports waiting and runs no phase of its own); both print the same run."""
    from tests.conftest import share_project_models

    cache = share_project_models(tmp_path / "cache")
    cmd = [sys.executable, "-m", "pruner", "prune", "--allocator", "uniform", "--method", "wanda", "--sparsity", "0.5",
           "--preset", "tiny", "--data-dir", data_dir, "--cache-dir", str(cache), "--device", "cpu"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    keys = [next(line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("run ")) for out, _ in outs]
    assert keys[0] == keys[1] and [p.name for p in (cache / "runs").iterdir()] == [keys[0]]
    waited = [err for _, err in outs if "waiting for the same prune in another process" in err]
    worked = [err for _, err in outs if "waiting for the same prune" not in err]
    assert len(waited) == 1 and len(worked) == 1, [e[-500:] for _, e in outs]
    assert "prune:" in worked[0] and "prune:" not in waited[0]  # the pruning phase's progress bar: one process only
