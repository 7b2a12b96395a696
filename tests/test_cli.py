"""`python -m pruner` in a real subprocess: tables, JSON, and one-line errors with exit code 2 and no cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pruner.store.files import PROJECT_ROOT


def run_cli(*args, cache: Path, data_dir: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "pruner", *args, "--cache-dir", str(cache), "--data-dir", data_dir]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def cli_in_process(capsys, *args, cache: Path, data_dir: str | None):
    """The same CLI (``pruner.cli.main``) in this process: the refusals below need no Python start-up (about 3 s
    each, mostly importing torch); ``test_refusals_from_the_real_command`` checks the installed entry point."""
    from pruner.cli import main

    capsys.readouterr()
    try:
        code = main([*args, "--cache-dir", str(cache), *(["--data-dir", data_dir] if data_dir else [])])
    except SystemExit as stop:  # argparse's usage errors end the program
        code = stop.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_stats_and_allocate(tiny_folder, tmp_path, data_dir):
    r = run_cli("stats", "--model", tiny_folder, "--preset", "tiny", cache=tmp_path, data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split() == ["block", "M=3", "M=5", "M=7"] and len(lines) == 2 + 4
    assert "outlier statistics" in r.stderr and "4/4" in r.stderr  # the progress bar reached the last block
    assert len(list((tmp_path / "stats").iterdir())) == 1

    r = run_cli("allocate", "--model", tiny_folder, "--preset", "tiny", "--allocator", "owl", "--sparsity", "0.7",
                "--lam", "0.08", "--m", "5", "--json", cache=tmp_path, data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["allocator"] == "owl" and out["params"] == {"lam": 0.08, "m": 5.0}
    assert len(out["block_sparsity"]) == 4 and len(out["layer_sparsity"]) == 4 * 7
    first = out["layer_sparsity"][0]
    assert (first["block"], first["layer"]) == (0, "self_attn.q_proj")
    assert first["sparsity"] == pytest.approx(out["block_sparsity"][0], abs=1e-12)
    assert abs(out["overall_sparsity"] - 0.7) < 1e-6
    assert "outlier statistics" not in r.stderr  # reused the cached statistics


@pytest.mark.parametrize("args, message", [
    (["allocate", "--sparsity", "1.5"], "target sparsity S must be in (0, 1)"),
    (["allocate", "--sparsity", "0.5", "--lam", "-0.1"], "λ (lam) must be a number in [0, 0.5); got -0.1"),
    (["allocate", "--sparsity", "0.5", "--m", "0"], "M (m) must be a number in [0.01, 9976]; got 0.0"),
    (["allocate", "--sparsity", "0.5", "--allocator", "er", "--lam", "0.1"],
     "--lam does not apply here: allocator er takes no parameters"),
    (["prune", "--sparsity", "0.5", "--method", "wanda", "--rho", "2"],
     "--rho does not apply here: allocator owl takes --lam, --m; method wanda takes no parameters"),
    (["prune", "--sparsity", "0.5", "--method", "admm", "--iterations", "0"], "iterations must be an integer ≥ 1"),
    (["stats", "--model", "/etc"], "local folder '/etc' is not a Hugging Face model folder (it has no config.json)"),
    (["stats", "--seqlen", "100000"], "seqlen 100000 is longer than smollm2-135m's context of 8192 tokens"),
    (["eval", "--run", "../../etc", "--ppl"], "run key must be 16 hexadecimal digits"),
    (["recover", "--run", "../../etc"], "run key must be 16 hexadecimal digits"),
    (["allocate", "--sparsity", "0.5", "--allocator", "magic"], "invalid choice: 'magic' (choose from 'uniform'"),
    (["stats", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["stats", "--nsamples", "0"], "nsamples must be an integer >= 1"),
    (["stats", "--preset", "huge"], "invalid choice: 'huge'"),
])
def test_bad_input_one_line_exit_2_nothing_cached(args, message, tmp_path, data_dir, capsys):
    r = cli_in_process(capsys, *args, cache=tmp_path, data_dir=data_dir)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["prune", "--nm", "3:2"], "N:M needs integers 1 ≤ N < M"),  # the CLI's own check
    (["allocate", "--sparsity", "0.5", "--lam", "-0.1"], "λ (lam) must be a number in [0, 0.5); got -0.1"),  # a spec's
    (["allocate", "--sparsity", "0.5", "--allocator", "magic"], "invalid choice: 'magic' (choose from 'uniform'"),  # argparse
])
def test_refusals_from_the_real_command(args, message, tmp_path, data_dir):
    """`python -m pruner` itself: one line on stderr (nothing else writes there), exit code 2, nothing cached."""
    r = run_cli(*args, cache=tmp_path, data_dir=data_dir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, \
        r.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_data_dir(tmp_path):
    r = run_cli("stats", cache=tmp_path, data_dir=str(tmp_path / "absent"))
    assert r.returncode == 2 and "data directory" in r.stderr and "does not exist" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_lambda_too_wide_leaves_cache_empty(tiny_folder, tmp_path, data_dir, capsys):
    r = cli_in_process(capsys, "allocate", "--model", tiny_folder, "--preset", "tiny", "--sparsity", "0.9", "--lam", "0.45",
                cache=tmp_path, data_dir=data_dir)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: λ=0.45 is too wide for S=0.9") and "allowed here: 0 ≤ λ <" in last
    assert not (tmp_path / "stats").exists() or list((tmp_path / "stats").iterdir()) == []


def test_prune_eval_and_out(tiny_folder, tmp_path, data_dir, capsys):
    cache, out = tmp_path / "cache", tmp_path / "exported"
    r = run_cli("prune", "--model", tiny_folder, "--preset", "tiny", "--allocator", "owl", "--method", "wanda",
                "--sparsity", "0.7", "--lam", "0.05", "--m", "3", "--out", str(out), cache=cache, data_dir=data_dir,
                env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    key = r.stdout.split()[1].rstrip(":")
    # the threads it computed with (a SparseGPT run's weights depend on them): the process's, here 1
    assert json.loads((cache / "runs" / key / "manifest.json").read_text())["execution"]["torch_threads"] == 1
    assert "achieved sparsity 0.69" in r.stdout and "prune" in r.stderr  # progress bar per block
    assert (out / "model.safetensors").is_file() and json.loads((out / "manifest.json").read_text())["key"] == key
    r = cli_in_process(capsys, "eval", "--run", key, "--ppl", "--max-chunks", "2", "--eval-seqlen", "64", "--json",
                       cache=cache, data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    assert "partial: first 2 of" in r.stdout
    result = json.loads(r.stdout[r.stdout.index("{"):])["perplexity"]
    assert result["chunks"] == 2 and result["perplexity"] > 1
    r = run_cli("eval", "--run", key, "--zeroshot", "--tasks", "rte,winogrande", "--limit", "2", cache=cache,
                data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    assert "zero-shot accuracy (partial: first 2 documents per task): RTE " in r.stdout and "WinoGrande" in r.stdout
    stored = json.loads((cache / "runs" / key / "manifest.json").read_text())["metrics"]["zeroshot:local:limit2"]
    assert list(stored["tasks"]) == ["rte", "winogrande"] and stored["tasks"]["rte"]["n"] == 2
    rte = stored["tasks"]["rte"]
    assert f"RTE {rte['acc']:.3f} ± {rte['acc_stderr']:.3f}" in r.stdout and "± standard error" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["prune", "--nm", "3:2"], "N:M needs integers 1 ≤ N < M"),
    (["prune"], "--sparsity is required"),
    (["prune", "--sparsity", "0.5", "--method", "obs"], "invalid choice: 'obs'"),
    (["prune", "--sparsity", "0.7", "--nm", "2:4"], "with N:M 2:4 the target sparsity is 0.5"),
    (["prune", "--sparsity", "0.5", "--max-chunks", "0"], "--max-chunks must be ≥ 1"),
    (["prune", "--sparsity", "0.5", "--drop-weights"], "--drop-weights keeps only the run's evaluations: add --ppl"),
    (["prune", "--sparsity", "0.5", "--ppl", "--drop-weights", "--out", "x"], "--out copies the weights that"),
    (["eval", "--run", "deadbeef", "--ppl"], "run key must be 16 hexadecimal digits (as `prune` prints them); got 'deadbeef'"),
    (["eval", "--run", "0123456789abcdef", "--ppl"], "no run '0123456789abcdef'"),
    (["eval", "--run", "deadbeef"], "nothing to evaluate: pass --ppl"),
    (["eval", "--run", "deadbeef", "--zeroshot", "--tasks", "mmlu"], "allowed: boolq, rte, hellaswag"),
    (["eval", "--run", "deadbeef", "--zeroshot", "--limit", "0"], "--limit must be ≥ 1"),
    (["eval", "--speed"], "--speed compares a pruned run with its dense model: pass --run KEY"),
    (["eval", "--run", "deadbeef", "--speed", "--runs", "5"], "runs must be ≥ 30"),
])
def test_prune_eval_bad_input(args, message, tmp_path, data_dir, capsys):
    r = cli_in_process(capsys, *args, cache=tmp_path, data_dir=data_dir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_prune_seeds_make_a_group_with_a_seed_interval(tiny_folder, tmp_path, data_dir):
    r = run_cli("prune", "--model", tiny_folder, "--preset", "tiny", "--allocator", "uniform", "--method", "wanda",
                "--sparsity", "0.6", "--seeds", "2", "--seed", "3", "--ppl", "--max-chunks", "2",
                cache=tmp_path, data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    keys = [line.split()[1].rstrip(":") for line in r.stdout.splitlines() if line.startswith("run ")]
    assert len(set(keys)) == 2 and "calibration seed 3" in r.stdout and "calibration seed 4" in r.stdout
    # every perplexity carries its evaluation interval, the group its seed interval
    assert r.stdout.count("(95% evaluation interval over 2 chunks)") == 2 and "(partial: first 2 of" in r.stdout
    group = next(line for line in r.stdout.splitlines() if line.startswith("group of 2 calibration seeds (3, 4)"))
    assert group.endswith("(95%, over 2 seeds, partial)")
    seeds = [json.loads((tmp_path / "runs" / k / "manifest.json").read_text())["spec"]["calib"]["seed"] for k in keys]
    assert seeds == [3, 4]
    stored = json.loads((tmp_path / "runs" / keys[0] / "manifest.json").read_text())["metrics"]
    (result,) = stored.values()
    assert len(result["chunk_mean_nll"]) == 2 and result["interval"]["n"] == 2
    assert result["interval"]["low"] < result["perplexity"] < result["interval"]["high"]


def test_prune_drop_weights_keeps_the_numbers_and_force_restores_them(tiny_folder, tmp_path, data_dir, capsys):
    """A study's runs can keep only their manifest and metrics: the weights go, the run still answers from its
    metrics, whatever needs the weights says how to get them back, and a forced prune brings back the same model."""
    from pruner.runs.execute import load_run
    from pruner.runs.manifest import BadRun, run_zip

    args = ("prune", "--model", tiny_folder, "--preset", "tiny", "--allocator", "uniform", "--method", "wanda",
            "--sparsity", "0.6", "--ppl", "--max-chunks", "2")
    r = run_cli(*args, "--drop-weights", cache=tmp_path, data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    key = r.stdout.split()[1].rstrip(":")
    folder = tmp_path / "runs" / key
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not list(folder.rglob("*.safetensors")) and (folder / "config.json").is_file()
    assert manifest["weights_dropped"]["bytes"] > 0 and len(manifest["metrics"]) == 1
    ((name, before),) = manifest["metrics"].items()
    # the first prune ran as a subprocess (the installed command); the rest run the same CLI in this process
    # (``pruner.cli.main``), which saves a Python start-up (about 8 s with transformers) each
    def cli_here(*argv, data=True):
        return cli_in_process(capsys, *argv, cache=tmp_path, data_dir=data_dir if data else None)

    again = cli_here(*args)  # same spec: the stored numbers answer
    assert again.returncode == 0 and f"{before['perplexity']:.3f}" in again.stdout, again.stderr
    with pytest.raises(BadRun, match="its weights were dropped after evaluation"):
        load_run(folder)
    with pytest.raises(BadRun, match="its weights were dropped after evaluation"):
        run_zip(folder)
    r = cli_here("eval", "--run", key, "--ppl", "--max-chunks", "1")  # fewer chunks: from the stored chunk NLLs
    assert r.returncode == 0 and f"taken from the stored {name} (its first 1 of 2 "\
        "chunks)" in r.stdout, r.stderr
    r = cli_here("eval", "--run", key, "--ppl", "--max-chunks", "3")  # more chunks than stored: needs the weights
    assert r.returncode == 2 and "its weights were dropped after evaluation" in r.stderr and "--force" in r.stderr
    r = cli_here(*args, "--force")
    assert r.returncode == 0, r.stderr
    restored = json.loads((folder / "manifest.json").read_text())
    assert "weights_dropped" not in restored and (folder / "model.safetensors").is_file()
    assert restored["metrics"][name]["perplexity"] == before["perplexity"]  # the same weights again
    # the cache command drops an evaluated run's weights, and refuses a run that has no evaluation to keep
    def cache_cli(*args):  # `cache` takes no data folder
        return cli_here("cache", *args, data=False)

    for bad, message in ((["0123456789abcdef"], "--drop-weights takes keys of runs in"),
                         ([key, "../x"], "run key must be 16 hexadecimal digits")):
        r = cache_cli("--drop-weights", *bad)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    assert (folder / "model.safetensors").is_file()  # nothing removed while a later key was bad
    r = cache_cli("--drop-weights", key)
    assert r.returncode == 0 and "freed" in r.stdout and not list(folder.rglob("*.safetensors")), r.stderr
    assert "1 of the runs keep only their manifest and metrics" in cache_cli().stdout
    r = cli_here(*args[:-5], "--sparsity", "0.5")  # not evaluated
    other = r.stdout.split()[1].rstrip(":")
    r = cache_cli("--drop-weights", other)
    assert r.returncode == 2 and f"run {other} has no evaluation yet" in r.stderr
    assert (tmp_path / "runs" / other / "model.safetensors").is_file()
