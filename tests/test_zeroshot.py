"""Zero-shot accuracy through upstream lm-eval on the offline task files: prompts from the local files, numbers
equal to a direct log-likelihood computation, results merged into the run's manifest."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pruner.evaluate.zeroshot import TASKS, parse_tasks, request_cache_file, write_local_tasks, zeroshot_accuracy
from pruner.runs import metrics
from pruner.store.files import read_manifest


def test_parse_tasks_names_the_allowed_ones():
    assert parse_tasks("rte, boolq,rte") == ("rte", "boolq")
    assert parse_tasks(None) == tuple(TASKS) and len(TASKS) == 7
    with pytest.raises(ValueError, match="allowed: boolq, rte, hellaswag"):
        parse_tasks(["mmlu"])


def test_local_task_yaml_includes_lm_eval_and_reads_the_data_dir(data_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    names = write_local_tasks(["arc_easy", "boolq"], data_dir, tmp_path)
    text = (tmp_path / f"{names['arc_easy']}.yaml").read_text()
    assert "lm_eval/tasks/arc/arc_easy.yaml" in text and "arc/arc_easy_test.jsonl" in text
    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load([names["boolq"]])["tasks"][names["boolq"]]
    first = json.loads(open(f"{data_dir}/boolq/validation.jsonl").readline())
    doc = next(iter(task.eval_docs))
    assert task.doc_to_text(doc) == f"{first['passage']}\nQuestion: {first['question']}?\nAnswer:"
    assert len(task.eval_docs) == sum(1 for _ in open(f"{data_dir}/boolq/validation.jsonl"))


def test_missing_task_file_is_named(tmp_path):
    from pruner.data import DataError

    with pytest.raises(DataError, match="rte/validation.jsonl"):  # a clean one-line error in the CLI, not a traceback
        write_local_tasks(["rte"], tmp_path, tmp_path)


def test_a_data_folder_whose_name_yaml_would_cut_short_is_read_whole(data_dir, tmp_path):
    """A folder named "data #x": unquoted in YAML, everything from " #" on would be a comment."""
    from lm_eval.tasks import TaskManager

    odd = tmp_path / "data #x: {y}"
    (odd / "rte").mkdir(parents=True)
    (odd / "rte" / "validation.jsonl").write_text(Path(data_dir, "rte", "validation.jsonl").read_text())
    names = write_local_tasks(["rte"], odd, tmp_path)
    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load([names["rte"]])["tasks"][names["rte"]]
    assert len(task.eval_docs) == sum(1 for _ in open(f"{data_dir}/rte/validation.jsonl"))


def _loglik(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) with lm-eval's split: encode the whole string, the continuation is what
    follows the context's own tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_arc_easy_accuracy_equals_direct_loglikelihood(smollm2, data_dir):
    limit = 6
    result = zeroshot_accuracy(smollm2.model, smollm2.tokenizer, tasks=["arc_easy"], limit=limit, data_dir=data_dir)
    hits = hits_norm = 0
    with open(f"{data_dir}/arc/arc_easy_test.jsonl") as f:
        docs = [json.loads(next(f)) for _ in range(limit)]
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        conts = [" " + c for c in doc["choices"]["text"]]
        ll = [_loglik(smollm2.model, smollm2.tokenizer, context, c) for c in conts]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        hits += max(range(len(ll)), key=ll.__getitem__) == gold
        norm = [v / len(c.encode()) for v, c in zip(ll, conts)]
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == gold
    r = result["tasks"]["arc_easy"]
    assert r["n"] == limit and r["acc"] == pytest.approx(hits / limit) and r["acc_norm"] == pytest.approx(hits_norm / limit)
    assert result["partial"] and result["limit"] == limit and result["source"] == "local"


def test_run_manifest_gets_merged_results(own_tiny_run, data_dir):
    _, folder = own_tiny_run
    first = metrics.evaluate_zeroshot(folder, data_dir, tasks=["rte", "hellaswag"], limit=2)
    assert {"rte", "hellaswag"} <= set(first["tasks"]) and not first["complete"]  # 2 of the 7 tasks
    merged = metrics.evaluate_zeroshot(folder, data_dir, tasks="boolq", limit=2)
    stored = read_manifest(folder)["metrics"]["zeroshot:local:limit2"]
    assert stored == json.loads(json.dumps(merged))
    order = list(stored["tasks"])
    assert {"boolq", "rte", "hellaswag"} <= set(order) and order.index("boolq") < order.index("rte") < order.index(
        "hellaswag")  # the papers' order
    for r in stored["tasks"].values():
        assert r["n"] == 2 and r["acc"] in (0.0, 0.5, 1.0)
    assert "acc_norm" in stored["tasks"]["hellaswag"] and "acc_norm" not in stored["tasks"]["rte"]
    assert stored["mean_acc"] == pytest.approx(sum(r["acc"] for r in stored["tasks"].values()) / len(order))
    assert stored["partial"] and stored["lm_eval"].startswith("0.4")
    assert not (Path(folder) / metrics.ZEROSHOT_REQUESTS).exists()  # finished tasks leave no request cache behind


def test_bad_limit_is_rejected(own_tiny_run, data_dir):
    _, folder = own_tiny_run
    before = read_manifest(folder)
    with pytest.raises(ValueError, match="limit must be a whole number >= 1"):
        metrics.evaluate_zeroshot(folder, data_dir, tasks="rte", limit=0)
    assert read_manifest(folder) == before


def test_a_cancel_keeps_the_tasks_already_finished(own_tiny_run, data_dir):
    """Results are saved task by task: cancelled after the first of two tasks, the first is in the manifest."""
    from pruner.engine.calibrate import Cancelled

    _, folder = own_tiny_run
    done = []
    with pytest.raises(Cancelled, match="after 1 of 2 tasks"):
        metrics.evaluate_zeroshot(folder, data_dir, tasks=["winogrande", "openbookqa"], limit=3,
                                  progress=lambda i, n: done.append(i), should_cancel=lambda: bool(done))
    stored = read_manifest(folder)["metrics"]["zeroshot:local:limit3"]
    assert list(stored["tasks"]) == ["winogrande"] and stored["tasks"]["winogrande"]["n"] == 3
    assert stored["seconds"] == pytest.approx(stored["tasks"]["winogrande"]["seconds"], abs=0.01)


def _request_rows(db: Path) -> int:
    import sqlite3

    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as con:
        try:
            return con.execute("select count(*) from unnamed").fetchone()[0]
        except sqlite3.OperationalError:  # the table is created with the first commit
            return 0


def test_a_task_killed_midway_resumes_from_its_last_answered_request(tiny_folder, data_dir, tmp_path):
    """A real process evaluating RTE is killed (SIGKILL) once some requests are answered; run again with the same
    request cache, the task computes the rest and gets exactly the accuracy of an uninterrupted run."""
    import transformers as tf

    limit, prefix = 40, tmp_path / "rte"
    db = request_cache_file(prefix)
    script = ("import sys, transformers as tf; from pruner.evaluate.zeroshot import zeroshot_accuracy; "
              "m = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = tf.AutoTokenizer.from_pretrained(sys.argv[1]); "
              "zeroshot_accuracy(m, t, tasks=['rte'], limit=int(sys.argv[2]), data_dir=sys.argv[3], batch_size=1, "
              "request_cache=sys.argv[4])")
    proc = subprocess.Popen([sys.executable, "-c", script, tiny_folder, str(limit), data_dir, str(prefix)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _request_rows(db) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    answered, total = _request_rows(db), 2 * limit  # two answers (entailment or not) per RTE document
    assert 0 < answered < total, (answered, proc.stderr.read().decode()[-2000:])

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_folder)
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_folder)
    resumed = zeroshot_accuracy(model, tokenizer, tasks=["rte"], limit=limit, data_dir=data_dir,
                                request_cache=prefix)
    assert _request_rows(db) == total
    whole = zeroshot_accuracy(model, tokenizer, tasks=["rte"], limit=limit, data_dir=data_dir)
    assert resumed["tasks"] == whole["tasks"]

    # the kept answers are what the resumed run used: a model with every weight zeroed, given the same (now
    # complete) cache, computes nothing and reports the first model's accuracy
    zeroed = tf.AutoModelForCausalLM.from_pretrained(tiny_folder)
    with torch.no_grad():
        for p in zeroed.parameters():
            p.zero_()
    again = zeroshot_accuracy(zeroed, tokenizer, tasks=["rte"], limit=limit, data_dir=data_dir,
                              request_cache=prefix)
    assert again["tasks"] == whole["tasks"]

