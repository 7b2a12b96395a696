"""Runs on disk: complete folders only, reuse by key, save → load → same logits, metrics in the manifest."""

import copy
import json
import subprocess
import sys
import zipfile

import pytest
import torch

from pruner.allocation import allocate
from pruner.core.memory import PEAK_SINCE_PROCESS, PEAK_SINCE_RESET
from pruner.data import calibration_tokens
from pruner.engine import artifacts
from pruner.engine.calibrate import Cancelled
from pruner.engine.prune import layer_targets, prune_model
from pruner.model.catalogue import ModelSpec
from pruner.model.loading import load_model
from pruner.runs import metrics
from pruner.runs.execute import load_run, run_prune
from pruner.runs.manifest import BadRun, drop_weights, list_runs, run_zip
from pruner.specs import CalibSpec, PruneSpec
from pruner.store.files import PROJECT_ROOT, add_metrics, atomic_dir, read_manifest, update_metrics


@pytest.fixture
def spec(tiny_folder, data_dir):
    return PruneSpec(model=ModelSpec(tiny_folder, device="cpu"), calib=CalibSpec(nsamples=4, seqlen=64, data_dir=data_dir),
                     allocator="owl", method="wanda", sparsity=0.5, allocator_params={"lam": 0.05, "m": 3})


def test_run_folder_manifest_and_reuse(spec, tmp_path):
    phases = []
    folder = run_prune(spec, tmp_path, progress=lambda p, d, t: phases.append((p, d, t)))
    assert ("statistics", 4, 4) in phases and ("prune", 4, 4) in phases
    for name in ("model.safetensors", "config.json", "tokenizer.json", "manifest.json"):
        assert (folder / name).is_file()
    m = read_manifest(folder)
    assert m["key"] == spec.key() and m["spec"]["allocator"] == "owl" and m["spec"]["allocator_params"]["lam"] == 0.05
    assert set(m["versions"]) >= {"torch", "transformers", "pruner"}
    assert len(m["allocation"]["block_sparsity"]) == 4 and len(m["achieved"]["layers"]) == 28
    for layer in m["achieved"]["layers"]:
        in_features = 32 if layer["name"] != "mlp.down_proj" else 48
        assert abs(layer["achieved"] - layer["allocated"]) <= 1 / in_features
    assert m["memory"]["process_peak_rss_gb"] > 0 and m["timings_s"]["prune"] > 0
    if sys.platform == "linux":  # this process ran earlier tests: the peak is the run's own
        assert m["memory"]["peak_rss_since"] == PEAK_SINCE_RESET
    assert [r.key for r in list_runs(tmp_path).runs] == [spec.key()]
    # same spec: returned as is, not recomputed
    assert run_prune(spec, tmp_path, progress=lambda *a: pytest.fail("recomputed")) == folder
    again = run_prune(spec, tmp_path, force=True)
    assert read_manifest(again)["created"] >= m["created"]


PEAK_SCRIPT = """
import json
from pruner.core.memory import peak_rss_gb, reset_peak_rss
big = b"x" * (600 * 2**20)  # written, so resident
del big  # a large allocation goes back to the OS at once
before = peak_rss_gb()
reset = reset_peak_rss()
small = b"y" * (50 * 2**20)
print(json.dumps({"before": before, "reset": reset, "after": peak_rss_gb()}))
"""


def test_a_run_s_peak_memory_is_its_own_not_the_process_s():
    """A job worker runs many jobs in one process: every run after the SparseGPT search recorded the search's 9.76
    GiB as its own peak (ru_maxrss is the process's, and survives exec). In a real process: 600 MB written and freed,
    the peak reset, 50 MB written: the peak read afterwards is that of the window, and says so."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         check=True)
    got = json.loads(out.stdout)
    (before, since_before), (after, since_after) = got["before"], got["after"]
    assert before >= 0.58 and since_before == PEAK_SINCE_PROCESS
    if sys.platform == "linux":
        assert got["reset"] and since_after == PEAK_SINCE_RESET
        assert after < before - 0.45  # the 600 MB are not in the window's peak
    else:
        assert since_after == PEAK_SINCE_PROCESS


def test_saved_run_loads_with_the_same_logits(spec, tmp_path):
    folder = run_prune(spec, tmp_path)
    loaded, _ = load_run(folder)
    # prune a fresh copy in memory the same way
    base = load_model(spec.model)
    stats = artifacts.get_stats(spec.stats_spec, tmp_path, loaded=base)
    alloc = allocate("owl", stats, 0.5, lam=0.05, m=3)
    model = copy.deepcopy(base.model)
    targets = layer_targets(alloc.layer_sparsity, list(zip(stats.layer_block.tolist(), stats.layer_names)), None)
    prune_model(model, calibration_tokens(base.tokenizer, spec.calib), "wanda", targets, "row")
    ids = torch.randint(0, 1000, (2, 12))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert not torch.equal(base.model(ids).logits, model(ids).logits)  # the dense model was left alone


def test_cancelled_run_leaves_nothing(spec, tmp_path):
    with pytest.raises(Cancelled):
        run_prune(spec, tmp_path, should_cancel=lambda: True)
    folder = tmp_path / "runs"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_perplexity_lands_in_manifest_and_reproduces(spec, tmp_path, data_dir):
    folder = run_prune(spec, tmp_path)
    r1 = metrics.evaluate_perplexity(folder, data_dir, max_chunks=2, seqlen=64)
    r2 = metrics.evaluate_perplexity(folder, data_dir, max_chunks=2, seqlen=64, reuse=False)  # computed again
    assert r1["perplexity"] == r2["perplexity"] and r1["partial"] and r1["chunks"] == 2
    # asked again under the same protocol: the stored result, not a new evaluation
    assert metrics.evaluate_perplexity(folder, data_dir, max_chunks=2, seqlen=64) is not None
    assert metrics.stored_perplexity(folder, max_chunks=2, seqlen=64) == r2
    assert metrics.stored_perplexity(folder, max_chunks=3, seqlen=64) is None
    assert metrics.stored_perplexity(folder, max_chunks=None, seqlen=64) is None  # no full evaluation stored
    stored = read_manifest(folder)["metrics"]
    assert stored["perplexity:wikitext2-test:seq64:first2"]["perplexity"] == r1["perplexity"]


def test_first_chunks_of_a_longer_evaluation_need_no_weights(spec, tmp_path, data_dir):
    """A run evaluated on 3 chunks and then stripped of its weights still answers the 2-chunk protocol: the result
    derived from the first 2 chunk NLLs equals a direct 2-chunk evaluation (made before the weights went)."""
    import math

    folder = run_prune(spec, tmp_path)
    direct = metrics.evaluate_perplexity(folder, data_dir, max_chunks=2, seqlen=64)
    three = metrics.evaluate_perplexity(folder, data_dir, max_chunks=3, seqlen=64)
    manifest = read_manifest(folder)
    del manifest["metrics"]["perplexity:wikitext2-test:seq64:first2"]  # as if only the 3-chunk one had been run
    (folder / "manifest.json").write_text(json.dumps(manifest))
    drop_weights(folder)
    derived = metrics.evaluate_perplexity(folder, data_dir, max_chunks=2, seqlen=64)  # no BadRun: no forward pass
    assert derived["chunk_mean_nll"] == direct["chunk_mean_nll"] == three["chunk_mean_nll"][:2]
    assert math.isclose(derived["perplexity"], direct["perplexity"], rel_tol=1e-12)
    assert derived["interval"]["low"] == pytest.approx(direct["interval"]["low"], rel=1e-12)
    assert (derived["chunks"], derived["partial"], derived["tokens_scored"]) == (2, True, direct["tokens_scored"])
    assert derived["derived_from"] == "perplexity:wikitext2-test:seq64:first3 (its first 2 of 3 chunks)"
    # stored under its own protocol (groups and charts read it there); nothing beyond the 3 chunks is invented
    assert read_manifest(folder)["metrics"]["perplexity:wikitext2-test:seq64:first2"] == derived
    assert metrics.stored_perplexity(folder, max_chunks=4, seqlen=64) is None
    with pytest.raises(BadRun):
        metrics.evaluate_perplexity(folder, data_dir, max_chunks=4, seqlen=64)


def test_first_chunks_by_hand():
    """Chunk NLLs ln 2, ln 8, ln 4 over 3 chunks of 4 scored tokens: the first 2 give exp((ln 2 + ln 8)/2) = 4."""
    import math

    from pruner.runs.groups import first_chunks

    parent = {"dataset": "wikitext2-test", "seqlen": 5, "chunks": 3, "chunks_total": 10, "partial": True,
              "tokens_scored": 12, "seconds": 3.0, "tokens_per_second": 5.0, "kind": "token-level",
              "chunk_mean_nll": [math.log(2), math.log(8), math.log(4)]}
    r = first_chunks(parent, 2, "p")
    assert r["perplexity"] == pytest.approx(4.0, rel=1e-15) and r["tokens_scored"] == 8 and r["seconds"] == 2.0
    assert r["chunks"] == 2 and r["partial"] and r["interval"]["n"] == 2
    with pytest.raises(ValueError, match="at least 4 per-chunk NLLs; p kept 3"):
        first_chunks(parent, 4, "p")


def test_atomic_dir_keeps_target_on_error(tmp_path):
    target = tmp_path / "x"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("interrupted")
    assert (target / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def _fake_run(tmp_path):
    folder = tmp_path / "runs" / "abc"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"key": "abc", "metrics": {}}))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


WRITER = """
import sys
from pruner.store.files import add_metrics
folder, tag = sys.argv[1], sys.argv[2]
for i in range(60):
    add_metrics(folder, f"{tag}{i}", {"i": i})
"""


def test_metrics_written_by_two_processes_at_once_are_all_kept(tmp_path):
    folder = _fake_run(tmp_path)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), tag], cwd=PROJECT_ROOT)
               for tag in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    metrics = read_manifest(folder)["metrics"]
    assert sorted(metrics) == sorted(f"{t}{i}" for t in "ab" for i in range(60))  # none lost to the other writer
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no lock or temporary files left


def test_update_metrics_sees_the_stored_value(tmp_path):
    folder = _fake_run(tmp_path)
    seen = []
    for value in (1, 2):
        update_metrics(folder, "count", lambda previous, value=value: seen.append(previous) or {"n": value})
    assert seen == [None, {"n": 1}] and read_manifest(folder)["metrics"]["count"] == {"n": 2}


def test_run_zip_is_rebuilt_when_the_manifest_changes(tmp_path):
    folder = _fake_run(tmp_path)
    first = run_zip(folder)
    with zipfile.ZipFile(first) as z:
        assert json.loads(z.read("abc/manifest.json"))["metrics"] == {}
    assert run_zip(folder).stat().st_mtime_ns == first.stat().st_mtime_ns  # unchanged run: the same zip
    add_metrics(folder, "ppl", {"perplexity": 19.1})
    with zipfile.ZipFile(run_zip(folder)) as z:
        assert json.loads(z.read("abc/manifest.json"))["metrics"] == {"ppl": {"perplexity": 19.1}}
        assert z.read("abc/model.safetensors") == b"weights"


def test_prune_spec_validation():
    with pytest.raises(ValueError, match="unknown method 'obs'; choose one of magnitude, wanda, sparsegpt"):
        PruneSpec(method="obs")
    with pytest.raises(ValueError, match="with N:M 2:4 the target sparsity is 0.5"):
        PruneSpec(sparsity=0.7, nm="2:4")
    # a parameter the allocator does not declare is refused (silently dropping it would merge two requests)
    with pytest.raises(ValueError, match="allocator 'uniform' takes no parameter 'lam'; its parameters: none"):
        PruneSpec(allocator="uniform", allocator_params={"lam": 0.3})
    with pytest.raises(ValueError, match=r"λ \(lam\) must be a number in \[0, 0.5\); got 0.5"):
        PruneSpec(allocator="owl", allocator_params={"lam": 0.5})
    with pytest.raises(ValueError, match="ρ \\(rho\\) must be a number > 0; got 0"):
        PruneSpec(method="admm", method_params={"rho": 0})
    # defaults are filled in, so an explicit default and an omitted one are the same run
    assert PruneSpec(allocator="owl").allocator_params == {"lam": 0.08, "m": 5.0}
    assert PruneSpec(allocator="owl", allocator_params={"lam": 0.08}).key() == PruneSpec(allocator="owl").key()
    assert PruneSpec(method="admm").method_params == {"iterations": 20, "rho": 1.0}
    assert PruneSpec(method="magnitude").scope == "layer"
