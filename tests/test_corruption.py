"""Every cache artifact is checked against what it claims before it is used: learned allocations, damage tables and
run weights that are truncated, byte-flipped or another entry's are named, listed by `cache --stale`, and made
again once removed (statistics: tests/test_reliability.py)."""

import json
import shutil
import subprocess
import sys

import pytest

from pruner.engine import artifacts
from pruner.model.catalogue import ModelSpec
from pruner.predictor.cache import cached_table, get_damage_table
from pruner.predictor.table import PredictorSpec
from pruner.runs.execute import load_run
from pruner.runs.manifest import run_zip
from pruner.specs import CalibSpec, StatsSpec
from pruner.store.formats import CorruptArtifact
from pruner.store.layout import CacheLayout
from tests.conftest import copy_of_tiny_run

FAULTS = ("truncated", "byte-flipped", "foreign")


def _damage(path, fault, foreign=None):
    """Truncate ``path``, flip one of its bytes, or replace it with ``foreign`` (another entry's file)."""
    data = path.read_bytes()
    if fault == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "byte-flipped":
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01  # one bit: JSON stays JSON (a digit changes), an array stays loadable
        path.write_bytes(bytes(flipped))
    else:
        shutil.copyfile(foreign, path)


def _stats_spec(run, data_dir):
    spec = json.loads((run / "manifest.json").read_text())["spec"]
    calib = {k: spec["calib"][k] for k in ("nsamples", "seqlen", "seed")}
    return StatsSpec(ModelSpec(spec["model"]["path"], device="cpu"), CalibSpec(**calib, data_dir=data_dir))


def _stale(cache, kind, folder, contents=False):
    return CacheLayout.at(cache).stale_reason(kind, folder, contents=contents) or ""


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_learned_allocation_is_named_listed_and_learned_again(tiny_run, data_dir, tmp_path, fault):
    cache, run = copy_of_tiny_run(tiny_run, tmp_path / "cache")
    spec = _stats_spec(run, data_dir)
    first = artifacts.learn_allocation(spec, "besa", 0.5, {"beta": 50.0}, cache)
    other = artifacts.learn_allocation(spec, "besa", 0.6, {"beta": 50.0}, cache)  # another S: another entry
    layout = CacheLayout.at(cache)
    folder = layout.learned(artifacts.learned_key(spec, "besa", 0.5, {"beta": 50.0}))
    foreign = layout.learned(artifacts.learned_key(spec, "besa", 0.6, {"beta": 50.0}))
    if fault == "foreign":  # the whole entry of S = 60% copied under S = 50%'s key
        shutil.rmtree(folder)
        shutil.copytree(foreign, folder)
    else:
        _damage(folder / "learned.json", fault)
    with pytest.raises(CorruptArtifact, match=f"cached learned allocation {folder} cannot be used"):
        artifacts.cached_learned(spec, "besa", 0.5, {"beta": 50.0}, cache)
    assert _stale(cache, "learned", folder).startswith("corrupt: "), fault
    layout.remove([folder])
    again = artifacts.learn_allocation(spec, "besa", 0.5, {"beta": 50.0}, cache)
    assert again["layer_sparsity"] == first["layer_sparsity"] != other["layer_sparsity"]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_damage_table_is_named_listed_and_built_again(tiny_run, data_dir, tmp_path, fault):
    cache, run = copy_of_tiny_run(tiny_run, tmp_path / "cache")
    stats = _stats_spec(run, data_dir)
    spec = PredictorSpec(stats, windows=2, window_tokens=32, grid=(0.3, 0.6))
    other = PredictorSpec(stats, windows=2, window_tokens=32, grid=(0.4, 0.6))
    table = get_damage_table(spec, cache, data_dir=data_dir)
    get_damage_table(other, cache, data_dir=data_dir)
    layout = CacheLayout.at(cache)
    folder, foreign = layout.predictor(spec.key()), layout.predictor(other.key())
    if fault == "foreign":
        shutil.rmtree(folder)
        shutil.copytree(foreign, folder)
    else:
        _damage(folder / "table.npz", fault)
    with pytest.raises(CorruptArtifact, match=f"cached damage table {folder} cannot be used"):
        cached_table(spec, cache)
    assert _stale(cache, "predictors", folder).startswith("corrupt: "), fault
    layout.remove([folder])
    again = get_damage_table(spec, cache, data_dir=data_dir)
    assert (again.window_nll == table.window_nll).all() and again.meta["key"] == spec.key()


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_run_weights_are_named_never_loaded_and_listed_by_the_cleanup(tiny_run, tiny_folder, tmp_path, fault):
    cache, run = copy_of_tiny_run(tiny_run, tmp_path / "cache")
    weights = run / "model.safetensors"
    # another run's weights of the same shapes: the dense tiny model's (same size, other bytes)
    _damage(weights, fault, foreign=f"{tiny_folder}/model.safetensors")
    for read in (load_run, run_zip):
        with pytest.raises(CorruptArtifact, match=f"cached run {run} cannot be used: model.safetensors"):
            read(run)
    assert not CacheLayout.at(cache).export(run.name).exists()  # no zip was built from them
    by_size = _stale(cache, "runs", run)
    assert by_size.startswith("corrupt: ") if fault == "truncated" else by_size == ""  # a listing reads no weights
    assert _stale(cache, "runs", run, contents=True).startswith("corrupt: ")
    out = subprocess.run([sys.executable, "-m", "pruner", "cache", "--stale", "--cache-dir", str(cache)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and f"removed runs/{run.name}" in out.stdout, out.stdout + out.stderr
    assert not run.exists()


def test_a_run_folder_made_again_loads(tiny_run, tmp_path):
    """The recorded sizes and checksums are those of the files written: an intact run loads, and its copy too."""
    cache, run = copy_of_tiny_run(tiny_run, tmp_path / "cache")
    recorded = json.loads((run / "manifest.json").read_text())["files_sha256"]
    assert set(recorded) == {"model.safetensors"} and recorded["model.safetensors"]["bytes"] > 0
    model, _ = load_run(run)
    assert model is not None and _stale(cache, "runs", run, contents=True) == ""
