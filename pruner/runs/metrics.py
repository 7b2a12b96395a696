"""Metrics of stored runs and of dense models: WikiText-2 perplexity, zero-shot accuracy (lm-eval) and CPU speed
(DeepSparse). A run's results go into its manifest under a name that says the protocol (``perplexity:wikitext2:
seq2048[:first8]``, ``zeroshot:local[:limit100]``, ``speed:deepsparse:b1:t128:threads2``); the dense model's go
into ``cache/dense/<model key>/metrics.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from pruner.engine.calibrate import ProgressFn
from pruner.engine.memory_plan import check_whole_model, model_config
from pruner.evaluate.zeroshot import ZEROSHOT_DEFAULT_BATCH
from pruner.model.loading import LoadedModel, load_model
from pruner.runs.execute import PhaseProgress, load_run
from pruner.runs.manifest import read_run
from pruner.store.layout import CacheLayout


def _run_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


#: Ways out when an evaluation that needs the whole model does not fit.
_ZEROSHOT_WAYS = ["a smaller lm-eval batch (--zeroshot-batch)", "a machine with more memory (zero-shot accuracy has no "
                  "block-by-block mode: lm-eval runs the whole model)"]


def perplexity_protocol(seqlen: int, max_chunks: int | None = None, dataset: str = "wikitext2-test") -> str:
    """The metric name a perplexity evaluation is stored under: dataset, window and, for a partial evaluation, the
    number of leading chunks, e.g. "perplexity:wikitext2-test:seq2048:first8"."""
    return f"perplexity:{dataset}:seq{seqlen}" + (f":first{max_chunks}" if max_chunks is not None else "")


def protocol_options(name: str) -> tuple[int, int | None]:
    """(window, leading chunks or None) of a perplexity protocol name (``perplexity_protocol``'s inverse)."""
    found = re.fullmatch(r"perplexity:[^:]+:seq(\d+)(?::first(\d+))?", name)
    if not found:
        raise ValueError(f"not a perplexity protocol name: {name!r}")
    return int(found[1]), int(found[2]) if found[2] else None


def protocol_label(name: str) -> str:
    """A perplexity protocol in words, e.g. "WikiText-2 test, 2048-token windows, first 8 chunks (partial)"."""
    window, chunks = protocol_options(name)
    dataset = name.split(":")[1].replace("wikitext2-", "WikiText-2 ")
    return f"{dataset}, {window}-token windows, " + (f"first {chunks} chunks (partial)" if chunks else "all chunks")


def perplexity_metric_name(result: dict) -> str:
    return perplexity_protocol(result["seqlen"], result["chunks"] if result["partial"] else None, result["dataset"])


def stored_perplexity(folder: Path, *, max_chunks: int | None = None, seqlen: int | None = None) -> dict | None:
    """The run's stored WikiText-2 test perplexity under the protocol asked for (window ``seqlen``, default the
    model's; the first ``max_chunks`` chunks, or all), or None. A result for the first k chunks is also taken from
    a stored one over more chunks (``pruner.runs.groups.perplexity_result``: the same chunk NLLs, no weights needed),
    marked ``derived_from``."""
    from pruner.evaluate.perplexity import default_seqlen
    from pruner.runs.groups import perplexity_result

    seqlen = seqlen or default_seqlen(_run_config(folder))
    return perplexity_result(read_run(folder).metrics, perplexity_protocol(seqlen, max_chunks))


def evaluate_perplexity(folder: Path, data_dir: str | None, *, max_chunks: int | None = None,
                        seqlen: int | None = None, device: str = "cpu", batch_size: int = 1,
                        progress: ProgressFn | None = None, should_cancel: Callable[[], bool] | None = None,
                        stream: bool = False, reuse: bool = True) -> dict:
    """WikiText-2 test perplexity of a stored run; the result is added to its manifest. ``stream``: block by block
    over all chunks, each block read from the run's shards for its turn (the model is never whole in memory).
    ``reuse``: a result already stored under the same protocol is returned as it is (evaluations are
    deterministic; a full one takes minutes here); False evaluates again."""
    from pruner.evaluate.perplexity import check_window, wikitext2_perplexity
    from pruner.store.files import add_metrics

    check_window(_run_config(folder), seqlen)  # before anything is loaded or a stored result is looked up
    if reuse:
        found = stored_perplexity(folder, max_chunks=max_chunks, seqlen=seqlen)
        if found is not None:
            if "derived_from" in found:  # stored under its own protocol, so that groups and charts find it
                add_metrics(folder, perplexity_metric_name(found), found)
            return found

    blocks = None
    if stream:
        model, tokenizer, blocks = stream_run(folder)
    else:
        check_whole_model(_run_config(folder), "perplexity", f"run {Path(folder).name}", seqlen=seqlen,
                          batch_size=batch_size, device=str(device),
                          ways=["--stream (block by block over all chunks: one block in memory)"])
        model, tokenizer = load_run(folder, device)
    result = wikitext2_perplexity(model, tokenizer, data_dir, seqlen=seqlen, max_chunks=max_chunks, device=device,
                                  batch_size=batch_size, progress=progress, should_cancel=should_cancel,
                                  blocks=blocks)
    add_metrics(folder, perplexity_metric_name(result), result)
    return result


def stream_run(folder: Path):
    """(skeleton model, tokenizer, block store) of a stored run, its blocks read from its shards on demand."""
    import torch
    from transformers import AutoTokenizer

    from pruner.model.anatomy import find_blocks
    from pruner.model.streaming import Checkpoint, StreamedBlocks, build_skeleton
    from pruner.runs.manifest import LORA_SUBFOLDER, require_weights

    require_weights(folder)
    if (Path(folder) / LORA_SUBFOLDER).is_dir():
        raise ValueError("a LoRA-recovered run is evaluated with its adapters attached, in memory; drop --stream")
    model = build_skeleton(folder, torch.float32)  # float32, as load_run
    blocks = StreamedBlocks(Checkpoint(folder), find_blocks(model)[0], torch.float32)
    return model, AutoTokenizer.from_pretrained(folder), blocks


def _dense_metrics_path(model_spec, cache_dir: Path | None) -> Path:
    return CacheLayout.at(cache_dir).dense_metrics(model_spec.key())


def dense_metrics(model_spec, cache_dir: Path | None = None) -> dict:
    """All cached metrics of the dense model ({metric name: result}); never computes."""
    path = _dense_metrics_path(model_spec, cache_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def _update_dense_metric(model_spec, cache_dir: Path | None, name: str, update: Callable[[dict | None], dict]) -> dict:
    """Set the dense model's cached metric ``name`` to ``update(previous or None)`` under a lock; returns it."""
    from pruner.store.files import update_json_entry

    path = _dense_metrics_path(model_spec, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return update_json_entry(path, name, update)[name]


def dense_perplexity(model_spec, data_dir: str | None, cache_dir: Path | None = None, *,
                     loaded: LoadedModel | None = None, max_chunks: int | None = None, seqlen: int | None = None,
                     batch_size: int = 1, progress: ProgressFn | None = None) -> dict:
    """WikiText-2 test perplexity of the dense model, cached under cache/dense/<model key>/metrics.json."""
    from pruner.evaluate.perplexity import default_seqlen, wikitext2_perplexity

    if loaded is None:
        check_whole_model(model_config(model_spec, cache_dir), "perplexity", f"the dense {model_spec.name}",
                          dtype_bytes=4 if model_spec.dtype == "float32" else 2, seqlen=seqlen,
                          batch_size=batch_size, ways=["a shorter --eval-seqlen", "a machine with more memory"])
    base = loaded if loaded is not None else load_model(model_spec, cache_dir)
    seqlen = seqlen or default_seqlen(base.model)
    for name, result in dense_metrics(model_spec, cache_dir).items():
        if name.startswith("perplexity") and result["seqlen"] == seqlen and (
                result["chunks"] == max_chunks or (max_chunks is None and not result["partial"])):
            return result
    if base.streamed:  # block by block, each block read from the checkpoint for its turn
        result = wikitext2_perplexity(base.model, base.tokenizer, data_dir, seqlen=seqlen, max_chunks=max_chunks,
                                      device=base.device, progress=progress, blocks=base.block_store())
    else:
        home = next(base.model.parameters()).device
        try:  # weights live on CPU between uses; evaluate on the compute device
            base.model.to(base.device)
            result = wikitext2_perplexity(base.model, base.tokenizer, data_dir, seqlen=seqlen, max_chunks=max_chunks,
                                          device=base.device, batch_size=batch_size, progress=progress)
        finally:
            base.model.to(home)
    _update_dense_metric(model_spec, cache_dir, perplexity_metric_name(result), lambda _previous: result)
    return result


def dense_perplexity_cached(model_spec, cache_dir: Path | None = None) -> dict | None:
    """The most recent cached dense perplexity of a model (None if never computed); never computes."""
    found = [v for k, v in dense_metrics(model_spec, cache_dir).items() if k.startswith("perplexity")]
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot accuracy (lm-eval)


#: folder (in a run folder, or beside the dense model's metrics) for lm-eval's request caches of unfinished tasks
ZEROSHOT_REQUESTS = "zeroshot-requests"


def zeroshot_metric_name(source: str, limit: int | None) -> str:
    return f"zeroshot:{source}" + (f":limit{limit}" if limit else "")


def _merge_zeroshot(previous: dict | None, result: dict) -> dict:
    """Tasks evaluated earlier under the same metric name (same source, limit and lm-eval version) are kept."""
    tasks = dict(previous["tasks"]) if previous and previous.get("lm_eval") == result["lm_eval"] else {}
    tasks.update(result["tasks"])
    from pruner.evaluate.zeroshot import DEFAULT_TASKS

    ordered = {t: tasks[t] for t in DEFAULT_TASKS if t in tasks}
    timed = [r["seconds"] for r in ordered.values() if "seconds" in r]  # per task since results are saved per task
    return {**result, "tasks": ordered, "mean_acc": sum(r["acc"] for r in ordered.values()) / len(ordered),
            "complete": len(ordered) == len(DEFAULT_TASKS),
            "seconds": round(sum(timed), 2) if len(timed) == len(ordered) else result["seconds"]}


def _zeroshot_task_by_task(model, tokenizer, device, data_dir, tasks, limit, source, batch_size, progress,
                           should_cancel, save: Callable[[dict], dict], request_dir: Path) -> dict:
    """lm-eval on ``tasks`` one task at a time, handing each task's result to ``save`` (which merges it into the
    store and returns the merged result) as soon as it is done: the full sets take hours here, and a crash or a
    cancel then keeps every finished task. Within a task, each answered request is kept in lm-eval's request cache
    under ``request_dir`` (one folder per model), so a task interrupted midway (HellaSwag's 40,168 requests take
    about three hours on two cores) resumes from its last answered request; the file is removed once the task's
    result is saved. Returns the last merged result."""
    import lm_eval

    from pruner.engine.calibrate import Cancelled
    from pruner.evaluate.zeroshot import parse_tasks, request_cache_file, zeroshot_accuracy

    names = parse_tasks(tasks)
    merged: dict = {}
    for i, name in enumerate(names):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"zero-shot evaluation cancelled after {i} of {len(names)} tasks (finished ones kept)")
        prefix = request_dir / f"{name}-{source}-{'all' if limit is None else f'limit{limit}'}-lm_eval{lm_eval.__version__}"
        result = zeroshot_accuracy(model, tokenizer, tasks=[name], limit=limit, source=source, data_dir=data_dir,
                                   batch_size=batch_size, device=str(device), request_cache=prefix)
        result["tasks"][name]["seconds"] = result["seconds"]
        merged = save(result)
        request_cache_file(prefix).unlink(missing_ok=True)
        if progress is not None:
            progress(i + 1, len(names))
    if request_dir.is_dir() and not any(request_dir.iterdir()):  # lm-eval creates it with the first cache file
        request_dir.rmdir()  # nothing unfinished: leave no empty folder in the run (or its download)
    return merged


def evaluate_zeroshot(folder: Path, data_dir: str | None, *, tasks=None, limit: int | None = None,
                      source: str = "local", device: str = "cpu", batch_size: int = ZEROSHOT_DEFAULT_BATCH,
                      progress: ProgressFn | None = None, should_cancel: Callable[[], bool] | None = None) -> dict:
    """Zero-shot accuracy of a stored run (lm-eval, in memory); each task is merged into its manifest under
    ``zeroshot:<source>[:limit<n>]`` as soon as it finishes. Returns the merged result."""
    from pruner.store.files import update_metrics

    check_whole_model(_run_config(folder), "zero-shot", f"run {Path(folder).name}", batch_size=batch_size,
                      device=str(device), ways=_ZEROSHOT_WAYS)
    model, tokenizer = load_run(folder, device)
    name = zeroshot_metric_name(source, limit)

    def save(result: dict) -> dict:
        # merged with what is stored at the moment of writing (another job may have added tasks meanwhile)
        return update_metrics(folder, name, lambda previous: _merge_zeroshot(previous, result))["metrics"][name]

    return _zeroshot_task_by_task(model, tokenizer, device, data_dir, tasks, limit, source, batch_size, progress,
                                  should_cancel, save, Path(folder) / ZEROSHOT_REQUESTS)


def dense_zeroshot(model_spec, data_dir: str | None, cache_dir: Path | None = None, *, loaded: LoadedModel | None = None,
                   tasks=None, limit: int | None = None, source: str = "local", batch_size: int = ZEROSHOT_DEFAULT_BATCH,
                   progress: ProgressFn | None = None, should_cancel: Callable[[], bool] | None = None) -> dict:
    """Zero-shot accuracy of the dense model, cached with its other metrics task by task; tasks already cached are
    not rerun (so an interrupted evaluation resumes where it stopped)."""
    from pruner.evaluate.zeroshot import parse_tasks

    name = zeroshot_metric_name(source, limit)
    previous = dense_metrics(model_spec, cache_dir).get(name)
    wanted = parse_tasks(tasks)
    missing = [t for t in wanted if not previous or t not in previous["tasks"]]
    if not missing:
        return previous
    if loaded is None:
        check_whole_model(model_config(model_spec, cache_dir), "zero-shot", f"the dense {model_spec.name}",
                          dtype_bytes=4 if model_spec.dtype == "float32" else 2, batch_size=batch_size,
                          ways=_ZEROSHOT_WAYS)
    base = loaded if loaded is not None else load_model(model_spec, cache_dir)
    home = next(base.model.parameters()).device

    def save(result: dict) -> dict:
        return _update_dense_metric(model_spec, cache_dir, name, lambda stored: _merge_zeroshot(stored, result))

    try:
        base.model.to(base.device)
        return _zeroshot_task_by_task(base.model, base.tokenizer, base.device, data_dir, missing, limit, source,
                                      batch_size, progress, should_cancel, save,
                                      _dense_metrics_path(model_spec, cache_dir).parent / ZEROSHOT_REQUESTS)
    finally:
        base.model.to(home)


# ---------------------------------------------------------------------------------------------------------------
# CPU speed (ONNX + DeepSparse)


def speed_metric_name(result: dict) -> str:
    s = result["spec"]
    return f"speed:{result['engine']}:b{s['batch']}:t{s['seqlen']}:threads{s['threads']}"


def evaluate_speed(folder: Path, speed_spec=None, cache_dir: Path | None = None, *, engine: str = "auto",
                   progress: PhaseProgress | None = None, data_dir: str | None = None,
                   int8_perplexity=None) -> dict:
    """Time the dense model and a stored run in DeepSparse or OpenVINO (or say why not); the result goes into the
    manifest.

    The dense model's ONNX graphs are kept under cache/dense/<model key>/onnx/<shape>/ for later runs; the pruned
    graphs are temporary. OpenVINO (``engine="openvino"``) calibrates its 8-bit step on the C4 text of
    ``data_dir``; with ``int8_perplexity`` (perplexity options: chunks, window) it also measures the WikiText-2
    perplexity of the 8-bit dense and pruned models, beside the float ones.
    """
    from pruner.evaluate.onnx_export import cached_graphs
    from pruner.evaluate.speed import export_and_measure
    from pruner.evaluate.speed_spec import SpeedSpec
    from pruner.store.files import add_metrics

    speed_spec = speed_spec or SpeedSpec()
    run = read_run(folder)
    if run.is_recovery:
        raise ValueError(f"run {run.key} is a LoRA recovery: its unmerged adapters are a dense branch beside "
                         f"the sparse weights, so a speed-up would not be the sparsity's; measure its parent "
                         f"{run.parent}")
    model_spec = run.model_spec()
    onnx_dir = CacheLayout.at(cache_dir).onnx(model_spec.key(), speed_spec.shape_key())
    # the dense model is loaded only when its graphs for this shape are not cached yet
    dense_needed = not cached_graphs(onnx_dir)
    check_whole_model(_run_config(folder), "speed", f"run {run.key}", models=2 if dense_needed else 1,
                      batch_size=speed_spec.batch, seqlen=speed_spec.seqlen,
                      ways=["a shorter --speed-seqlen or a smaller --speed-batch", "a machine with more memory (the "
                            "ONNX export and the engine take whole models)"])
    if engine == "openvino":
        result = _openvino_speed(folder, model_spec, speed_spec, onnx_dir, cache_dir, data_dir, int8_perplexity,
                                 progress)
    else:
        dense = load_model(model_spec, cache_dir).model if dense_needed else None
        pruned, _ = load_run(folder)
        result = export_and_measure(dense, pruned, speed_spec, dense_dir=onnx_dir, engine=engine, progress=progress)
    result["sparsity"] = run.achieved_overall
    add_metrics(folder, speed_metric_name(result), result)
    return result


def _openvino_speed(folder: Path, model_spec, speed_spec, onnx_dir: Path, cache_dir, data_dir, int8_perplexity,
                    progress) -> dict:
    """``evaluate_speed`` in OpenVINO: speed (where the CPU has AMX) and, when asked, the 8-bit step's perplexity
    next to the float perplexities of the same protocol (the pruned run's stored one, the dense model's cached)."""
    from pruner.evaluate import openvino_speed
    from pruner.evaluate.onnx_export import cached_graphs

    amx = openvino_speed.amx_status()
    if not amx["available"] and int8_perplexity is None:
        # nothing to load: the one line says why no speed-up is measured
        return openvino_speed.export_and_measure(None, None, None, speed_spec, dense_dir=onnx_dir, data_dir=data_dir)
    pruned, tokenizer = load_run(folder)
    need_dense = int8_perplexity is not None or not cached_graphs(onnx_dir)
    dense = load_model(model_spec, cache_dir).model if need_dense else None
    phase = (lambda name: (lambda d, t: progress(name, d, t))) if progress else None
    result = openvino_speed.export_and_measure(dense, pruned, tokenizer, speed_spec, dense_dir=onnx_dir,
                                               data_dir=data_dir, progress=progress)
    if int8_perplexity is not None:
        options = int8_perplexity
        quantized = openvino_speed.int8_perplexities(dense, pruned, tokenizer, data_dir,
                                                     max_chunks=options.max_chunks, seqlen=options.seqlen,
                                                     threads=speed_spec.n_threads, progress=progress)
        floats = {"pruned": stored_perplexity(folder, max_chunks=options.max_chunks, seqlen=options.seqlen),
                  "dense": dense_perplexity(model_spec, data_dir, cache_dir, max_chunks=options.max_chunks,
                                            seqlen=options.seqlen, progress=phase and phase("dense perplexity"))}
        # the per-chunk NLLs stay, so the 8-bit and float models can be compared paired by chunk
        result["perplexity"] = {name: {"float": floats[name], "int8": quantized[name]} for name in ("dense", "pruned")}
    return result

