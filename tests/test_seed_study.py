"""bench.seed_study on the tiny Llama: a refused allocation stops the study before anything is pruned, or is left
out and named with --skip-refused."""

import pytest

from bench import seed_study
from pruner.runs import list_runs

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
    assert "refused before pruning anything" in err
    # both seeds' refusals, each with DLP's allowed range for S = 0.8
    assert err.count("α=0.45 is too wide for S=0.8") == 2 and err.count("allowed here: 0 ≤ α <") == 2
    assert list_runs(tmp_path).runs == []  # uniform came first in the list and was not pruned either


def test_skip_refused_leaves_them_out_and_says_so(study_env, tmp_path, capsys):
    seed_study.main([*study_env, "--skip-refused"])
    out = capsys.readouterr().out
    runs = list_runs(tmp_path).runs
    assert sorted((r.spec["allocator"], r.spec["calib"]["seed"]) for r in runs) == [("uniform", 0), ("uniform", 1)]
    assert out.count("# left out, refused by the allocator: magnitude + dlp (α=0.45) @ 80%") == 2
    assert "| 1 | Uniform | 2 |" in out  # the ranking has the uniform group, with its two seeds
