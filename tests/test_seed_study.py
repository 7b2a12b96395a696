"""bench.seed_study on the tiny Llama: a refused allocation, or a stored run that cannot answer, stops the study before
anything is pruned, or is left out and named with --skip-refused; the matrix; progress."""

import re

import pytest

from bench import seed_study
from pruner.runs.manifest import list_runs

STUDY = ["--allocators", "uniform", "dlp:alpha=0.45", "--methods", "magnitude", "--sparsities", "0.8", "--seeds", "2",
         "--preset", "tiny", "--max-chunks", "1", "--drop-weights"]


@pytest.fixture
def study_env(tiny_folder, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNER_DATA_DIR", data_dir)
    return ["--model", tiny_folder, "--cache-dir", str(tmp_path), *STUDY]


def test_refused_allocation_stops_the_study_before_any_prune(study_env, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        seed_study.main(study_env)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "stopped before pruning anything" in err
    # both seeds' refusals, each with DLP's allowed range for S = 0.8
    assert err.count("α=0.45 is too wide for S=0.8") == 2 and err.count("allowed here: 0 ≤ α <") == 2
    assert list_runs(tmp_path).runs == []  # uniform came first in the list and was not pruned either


def test_skip_refused_leaves_them_out_and_says_so(study_env, tmp_path, capsys):
    seed_study.main([*study_env, "--skip-refused"])
    out, err = capsys.readouterr()
    assert "# 2 runs: 0 stored, 2 to prune" in out
    # a progress bar per phase on stderr, counting what the phase counts
    assert re.search(r"prune: 100%.*block/s", err) and re.search(r"perplexity: 100%.*chunk/s", err)
    runs = list_runs(tmp_path).runs
    assert sorted((r.spec["allocator"], r.spec["calib"]["seed"]) for r in runs) == [("uniform", 0), ("uniform", 1)]
    assert out.count("# left out, refused by the allocator: magnitude + dlp (α=0.45) @ 80%") == 2
    assert "| 1 | Uniform | 2 |" in out  # the ranking has the uniform group, with its two seeds


def test_matrix_cell_is_the_paired_ratio_of_the_runs(tiny_folder, data_dir, tmp_path, monkeypatch, capsys):
    """--matrix: OWL's cell is the geometric mean of its per-seed perplexity ÷ uniform's, from the cached runs."""
    import math

    monkeypatch.setenv("PRUNER_DATA_DIR", data_dir)
    common = ["--model", tiny_folder, "--cache-dir", str(tmp_path), "--methods", "magnitude", "--sparsities", "0.5",
              "--seeds", "2", "--preset", "tiny", "--max-chunks", "1"]
    with pytest.raises(SystemExit):  # --matrix without --versus is refused, saying what to give
        seed_study.main([*common, "--allocators", "uniform", "owl", "--matrix"])
    assert "give --versus" in capsys.readouterr().err
    seed_study.main([*common, "--allocators", "uniform", "owl", "--drop-weights"])
    # from the cache only; ER was not pruned, so its row says "–"
    seed_study.main([*common, "--allocators", "uniform", "owl", "er", "--report", "--versus", "uniform", "--matrix"])
    out = capsys.readouterr().out
    ppl = {(r.spec["allocator"], r.spec["calib"]["seed"]): next(iter(r.metrics.values()))["perplexity"]
           for r in list_runs(tmp_path).runs}
    ratio = math.exp((math.log(ppl["owl", 0] / ppl["uniform", 0]) + math.log(ppl["owl", 1] / ppl["uniform", 1])) / 2)
    table = out[out.index("| allocator | magnitude 50% |"):].splitlines()
    assert table[2].replace("**", "").startswith(f"| OWL (λ=0.08, M=5) | ×{ratio:.3f} [")
    assert table[3] == "| Erdős–Rényi | – |"

    # --versus best: each entry ÷ the best group of another allocator over the entry's seeds, that group named;
    # OWL's second setting is never OWL's baseline (nor the other way round); a --versus that is no entry is refused
    with pytest.raises(SystemExit):
        seed_study.main([*common, "--allocators", "uniform", "owl", "--report", "--versus", "atp"])
    assert "--versus must be one of the --allocators entries (uniform, owl) or 'best'; got 'atp'" in capsys.readouterr().err
    entries = ["uniform", "owl", "owl:lam=0.2,m=10", "er"]
    seed_study.main([*common, "--allocators", *entries[2:], "--drop-weights"])
    seed_study.main([*common, "--allocators", *entries, "--report", "--versus", "best", "--matrix"])
    out = capsys.readouterr().out
    ppl = {(r.spec["allocator"], r.spec["allocator_params"].get("lam", 0.08), r.spec["calib"]["seed"]):
           next(iter(r.metrics.values()))["perplexity"] for r in list_runs(tmp_path).runs}
    groups = {("uniform", 0.08): "Uniform", ("owl", 0.08): "OWL (λ=0.08, M=5)", ("owl", 0.2): "OWL (λ=0.2, M=10)",
              ("er", 0.08): "Erdős–Rényi"}
    log_mean = {g: (math.log(ppl[(*g, 0)]) + math.log(ppl[(*g, 1)])) / 2 for g in groups}
    rows = out[out.index("| allocator | magnitude 50% |"):].splitlines()[2:6]
    for g, row in zip(groups, rows):
        base = min((h for h in groups if h[0] != g[0]), key=log_mean.get)
        expected = math.exp(log_mean[g] - log_mean[base])
        assert row.replace("**", "").startswith(f"| {groups[g]} | ×{expected:.3f} [") and row.replace(
            "**", "").endswith(f"] vs {groups[base]} |"), (row, base)


def test_matrix_cell_text():
    from pruner.core.intervals import paired_ratio

    d = paired_ratio([0.0, 0.0, 0.0], [0.1, 0.1, 0.1], "seeds")  # every seed ×e^0.1: separable, zero width
    assert seed_study.matrix_cell(d, 3) == "**×1.105 [1.105, 1.105]**"
    d = paired_ratio([0.0, 0.0], [0.1, -0.1], "seeds")  # mean 0: not separable; 2 seeds of a 3-seed study named
    assert seed_study.matrix_cell(d, 3).startswith("×1.000 [") and seed_study.matrix_cell(d, 3).endswith("(2 seeds)")
    assert seed_study.matrix_cell(None, 3) == "–"
    assert seed_study.matrix_cell(paired_ratio([0.0], [4.6], "seeds"), 3) == "×99.5 (no interval) (1 seeds)"


def test_dropped_run_that_cannot_answer_stops_the_study_before_any_prune(study_env, tmp_path, capsys):
    """A run evaluated on 1 chunk whose weights were dropped cannot give 2 chunks: named before anything is pruned
    (not when its turn comes, after uniform's run), or left out with --skip-refused; asked for 1 chunk again, it
    answers from its metrics."""
    common = [*study_env[:4], "--methods", "magnitude", "--preset", "tiny", "--sparsities", "0.5", "--seeds", "1"]
    seed_study.main([*common, "--allocators", "owl", "--max-chunks", "1", "--drop-weights"])
    (dropped,) = list_runs(tmp_path).runs
    assert dropped.weights_dropped
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # uniform's run comes first in the study's order
        seed_study.main([*common, "--allocators", "uniform", "owl", "--max-chunks", "2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "stopped before pruning anything" in err
    assert f"seed 0: run {dropped.key} cannot be evaluated on the first 2 chunks" in err
    assert ":first1)" in err  # what it was evaluated on
    assert [r.key for r in list_runs(tmp_path).runs] == [dropped.key]  # uniform was not pruned
    seed_study.main([*common, "--allocators", "uniform", "owl", "--max-chunks", "2", "--skip-refused"])
    out = capsys.readouterr().out
    assert out.count(f"seed 0: run {dropped.key} cannot be evaluated") == 1 and "# left out: magnitude + owl" in out
    assert sorted(r.spec["allocator"] for r in list_runs(tmp_path).runs) == ["owl", "uniform"]
    seed_study.main([*common, "--allocators", "owl", "--max-chunks", "1"])  # answerable from its metrics: no stop
    assert "left out" not in capsys.readouterr().out


def test_records_carry_a_study_to_a_cache_that_lacks_its_runs(tiny_folder, data_dir, tmp_path, monkeypatch, capsys):
    """--records FILE: the runs a study reports are written to FILE (manifest and metrics); a study on another,
    empty cache reports them from FILE without pruning them again, prunes only what FILE lacks, and gives the same
    table; a record is replaced when its run's metrics grew; a damaged line is refused by its number."""
    import json

    from bench.records import read_records

    monkeypatch.setenv("PRUNER_DATA_DIR", data_dir)
    ledger = tmp_path / "docs" / "study.jsonl"
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--model", tiny_folder, "--methods", "magnitude", "--sparsities", "0.5", "--seeds", "2", "--preset",
              "tiny", "--max-chunks", "1", "--records", str(ledger), "--versus", "uniform", "--matrix"]
    seed_study.main(["--cache-dir", str(first), "--allocators", "uniform", "owl", *common])
    out = capsys.readouterr().out
    assert "# 4 runs: 0 stored, 0 recorded in" in out and "4 written to it now" in out
    table = out[out.index("| allocator | magnitude 50% |"):].splitlines()
    records = read_records(ledger)
    assert sorted(records) == sorted(r.key for r in list_runs(first).runs)
    assert all(r.recorded["commit"] and "cores" in r.recorded["machine"] for r in records.values())
    # numbers, not the per-layer table of achieved sparsities (most of a manifest's size)
    assert all("layers" in r.raw["achieved"] for r in list_runs(first).runs)
    assert all("layers" not in r.run.raw["achieved"] and r.run.achieved_block for r in records.values())
    assert not list(ledger.parent.glob("*.tmp"))

    # another cache: uniform and OWL come from the ledger (nothing pruned), ER is pruned and recorded
    seed_study.main(["--cache-dir", str(second), "--allocators", "uniform", "owl", "er", *common])
    out = capsys.readouterr().out
    assert "# 6 runs: 0 stored, 4 recorded in" in out and ", 2 to prune" in out
    assert "4 run(s) reported from it (recorded at commit" in out and "2 written to it now" in out
    assert sorted(r.spec["allocator"] for r in list_runs(second).runs) == ["er", "er"]
    matrix = out[out.index("| allocator | magnitude 50% |"):].splitlines()
    assert matrix[2] == table[2] and matrix[2].startswith("| OWL")  # OWL's cell: the same runs, from the ledger
    assert matrix[3].startswith("| Erdős–Rényi | ")
    assert len(read_records(ledger)) == 6

    # a second protocol on the first cache (its runs kept their weights): their records are replaced, in place
    seed_study.main(["--cache-dir", str(first), "--allocators", "uniform", "owl", *common[:-7], "--max-chunks", "2",
                     "--records", str(ledger)])
    assert "4 written to it now" in capsys.readouterr().out
    records = read_records(ledger)
    assert len(records) == 6 and sum(len(r.run.metric_names("perplexity")) == 2 for r in records.values()) == 4

    lines = ledger.read_text().splitlines()
    ledger.write_text("\n".join([*lines[:2], json.dumps({"manifest": {}}), *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"study\.jsonl, line 3: not a run record"):
        seed_study.main(["--cache-dir", str(second), "--allocators", "uniform", *common])
