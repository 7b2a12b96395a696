"""Zero-shot accuracy on the seven tasks of the Wanda / SparseGPT / OWL papers, through upstream lm-evaluation-harness.

lm-eval is used unmodified: for each task we write a small YAML that ``include:``s lm-eval's own task YAML (so the
prompt, the choices and the metrics are lm-eval's) and changes only where the documents come from:

* offline (``source="local"``): ``dataset_path: json`` with ``dataset_kwargs.data_files`` pointing at the files of
  the data directory (the ``../shared/data`` layout: field names as on the hub), and the split names of those files;
* online (``source="hub"``): lm-eval's own task names, which download the hub datasets as usual.

The model is evaluated as it is in memory (``HFLM(pretrained=<model>)``), so a pruned model never has to be written
and read back. Accuracies are fractions in [0, 1]; ``limit`` evaluates only the first ``limit`` documents of each
task and the result says so (``partial``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pruner.data import DataError
from pruner.store.files import default_data_dir


@dataclass(frozen=True)
class ZeroShotTask:
    name: str           #: lm-eval's task name (also ours)
    yaml: str           #: lm-eval's task YAML, relative to lm_eval/tasks
    data_file: str      #: the local file, relative to the data directory
    split: str          #: the split lm-eval evaluates (validation or test)
    label: str          #: how charts call it


TASKS: dict[str, ZeroShotTask] = {t.name: t for t in (
    ZeroShotTask("boolq", "super_glue/boolq/default.yaml", "boolq/validation.jsonl", "validation", "BoolQ"),
    ZeroShotTask("rte", "glue/rte/default.yaml", "rte/validation.jsonl", "validation", "RTE"),
    ZeroShotTask("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/validation.jsonl", "validation", "HellaSwag"),
    ZeroShotTask("winogrande", "winogrande/default.yaml", "winogrande/validation.jsonl", "validation", "WinoGrande"),
    ZeroShotTask("arc_easy", "arc/arc_easy.yaml", "arc/arc_easy_test.jsonl", "test", "ARC-e"),
    ZeroShotTask("arc_challenge", "arc/arc_challenge.yaml", "arc/arc_challenge_test.jsonl", "test", "ARC-c"),
    ZeroShotTask("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa/test.jsonl", "test", "OBQA"),
)}
#: The papers' seven tasks, in their table order.
DEFAULT_TASKS = tuple(TASKS)
#: lm-eval's batch size for the local model (requests per forward; padded to the longest of the batch).
ZEROSHOT_DEFAULT_BATCH = 8
#: Prefix of the offline task names, so they never collide with lm-eval's own (hub) tasks.
LOCAL_PREFIX = "local_"
SOURCES = ("local", "hub")


def parse_tasks(tasks) -> tuple[str, ...]:
    """Task names from a list or a comma-separated string; an unknown name is an error naming the allowed ones."""
    if tasks is None:
        return DEFAULT_TASKS
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown zero-shot task(s) {unknown or names!r}; allowed: {', '.join(TASKS)}")
    return tuple(dict.fromkeys(names))


def _lm_eval():
    try:
        import lm_eval
    except ImportError as e:  # pragma: no cover - lm_eval is in requirements.txt
        raise RuntimeError("zero-shot evaluation needs lm-eval: pip install 'lm_eval==0.4.13'") from e
    return lm_eval


def write_local_tasks(tasks, data_dir: str | os.PathLike | None, folder: Path) -> dict[str, str]:
    """Write one YAML per task into ``folder`` that includes lm-eval's YAML and reads the local file.

    Returns {our task name: the offline task name}. A missing data file is an error naming it.
    """
    lm_eval = _lm_eval()
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    names = {}
    for name in parse_tasks(tasks):
        task = TASKS[name]
        data_file = (data_dir / task.data_file).resolve()
        if not data_file.is_file():
            raise DataError(f"zero-shot task {name} needs {data_file} (data directory {data_dir}); "
                            f"set PRUNER_DATA_DIR or use source='hub' with internet access")
        included = tasks_root / task.yaml
        if not included.is_file():
            raise RuntimeError(f"lm-eval {lm_eval.__version__} has no task file {task.yaml}")
        local = LOCAL_PREFIX + name
        splits = {"training_split": "null", "validation_split": "null", "test_split": "null",
                  f"{task.split}_split": task.split}
        # paths as JSON strings (valid YAML scalars): a folder named "data #x" must not become "data" + a comment
        lines = [f"include: {json.dumps(str(included))}", f"task: {local}", "tag: null", "dataset_path: json",
                 "dataset_name: null", "dataset_kwargs:", "  data_files:", f"    {task.split}: {json.dumps(str(data_file))}"]
        lines += [f"{k}: {v}" for k, v in splits.items()]
        (folder / f"{local}.yaml").write_text("\n".join(lines) + "\n")
        names[name] = local
    return names


def _metrics_of(raw: dict) -> dict:
    """acc / acc_norm and their stderr from one task's lm-eval result dict ("acc,none" style keys)."""
    out = {}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in raw:
            out[metric] = float(raw[f"{metric},none"])
            stderr = raw.get(f"{metric}_stderr,none")
            out[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    return out


def request_cache_file(prefix: str | os.PathLike) -> Path:
    """The SQLite file lm-eval's ``use_cache=prefix`` writes (one process, so rank 0)."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + "_rank0.db")


def zeroshot_accuracy(model, tokenizer, *, tasks=None, limit: int | None = None, source: str = "local",
                      data_dir: str | os.PathLike | None = None, batch_size: int = 8, device: str = "cpu",
                      progress: Callable[[int, int], None] | None = None,
                      should_cancel: Callable[[], bool] | None = None,
                      request_cache: str | os.PathLike | None = None) -> dict:
    """Evaluate ``model`` (in memory) with lm-eval on ``tasks`` (default: the papers' seven), zero-shot.

    ``request_cache``: a path prefix for lm-eval's own request cache (``use_cache``: an SQLite file
    ``<prefix>_rank0.db`` to which every answered log-likelihood request is committed as it is answered). A task
    interrupted midway and run again with the same prefix recomputes only the requests it had not answered. The
    cache knows requests, not models: one prefix must only ever serve one model's weights.

    Returns {"tasks": {name: {acc, acc_stderr[, acc_norm, acc_norm_stderr], n}}, "mean_acc", "limit", "partial",
    "source", "lm_eval", "seconds"}. ``progress(done, total)`` is called per task, and ``should_cancel`` is checked
    between tasks (raises ``pruner.engine.calibrate.Cancelled``).
    """
    from pruner.engine.calibrate import Cancelled

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if limit is not None and (int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be a whole number >= 1 (or None for the full sets), got {limit!r}")
    names = parse_tasks(tasks)
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pruner-tasks-") as folder:
        if source == "local":
            mapping = write_local_tasks(names, data_dir, Path(folder))
            # only our folder is indexed: its YAMLs include lm-eval's own by absolute path, so indexing lm-eval's
            # whole task tree (about 10 s here, on every call) is not needed
            manager = TaskManager(include_path=folder, include_defaults=False)
        else:
            mapping, manager = {n: n for n in names}, TaskManager()
        for i, name in enumerate(names):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"zero-shot evaluation cancelled after {i} of {len(names)} tasks")
            out = lm_eval.simple_evaluate(model=lm, tasks=[mapping[name]], task_manager=manager, num_fewshot=0,
                                          limit=limit, log_samples=False, verbosity="ERROR",
                                          use_cache=None if request_cache is None else str(request_cache))
            raw = out["results"][mapping[name]]
            results[name] = _metrics_of(raw) | {"n": int(out["n-samples"][mapping[name]]["effective"])}
            if progress is not None:
                progress(i + 1, len(names))
    accs = [r["acc"] for r in results.values()]
    return {
        "tasks": results,
        "mean_acc": sum(accs) / len(accs),
        "limit": limit,
        "partial": limit is not None,
        "source": source,
        "lm_eval": lm_eval.__version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }
