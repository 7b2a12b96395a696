"""Pruned runs: pruning a model into a stored run, LoRA recovery of a run, loading a run, and reading stored runs
through a typed manifest (``RunManifest``) instead of by string keys.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from pruner.allocation import ALLOCATORS, NEEDS_STATISTICS, NEEDS_WEIGHTS, allocate, with_expert_split
from pruner.core.memory import peak_rss_gb, reset_peak_rss
from pruner.data import calibration_tokens
from pruner.engine.artifacts import (cached_learned, get_stats, learn_allocation, learned_layer_sparsity,
                                     load_cached_stats)
from pruner.engine.layout import ModelLayout
from pruner.engine.memory_plan import check_fits, check_whole_model, plan_for_spec, prune_ways_out, learning_kind
from pruner.model.anatomy import find_blocks, is_expert_unit, unsupported_message, unsupported_weights
from pruner.model.loading import LoadedModel, load_model, model_summary, resolve_device
from pruner.runs.manifest import LORA_SUBFOLDER, read_run, require_weights, weight_records
from pruner.store.files import MANIFEST, atomic_dir, exclusive
from pruner.store.formats import FILES_FIELD
from pruner.store.layout import CacheLayout, check_writable

PhaseProgress = Callable[[str, int, int], None]  # (phase, done, total)


def _start_peak_memory() -> None:
    """Measure the run's own peak memory from here (``_peak_memory``), not the process's: a job worker or the
    dashboard runs many jobs in one process, and an earlier, larger one (an allocation search) would otherwise be
    recorded as every later run's peak."""
    import torch

    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _execution(base) -> dict:
    """How the run was computed: streamed or not, on which device, with activations offloaded or not, and with how
    many CPU threads (``torch_threads``): SparseGPT's pruned weights depend on the thread count (float32 sums in
    another order flip a few masks in block 0 and more in every later block; on SmolLM2 at 70%, 1 thread instead of 2
    flipped 3.6% of the masks and moved the perplexity 9%, docs/results.md), so a run is reproduced bit for bit only
    with the same device and threads. The run's key leaves them out: it names what was asked, not where it ran."""
    import torch

    return {"streamed": base.streamed, "device": str(base.device),
            "offload_activations": base.spec.offload_activations, "torch_threads": torch.get_num_threads()}


def _peak_memory() -> dict:
    import torch

    gb, since = peak_rss_gb()
    out = {"process_peak_rss_gb": gb, "peak_rss_since": since}
    if torch.cuda.is_available():
        out["cuda_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _versions() -> dict:
    import platform

    import torch
    import transformers

    import pruner

    return {"pruner": pruner.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_prune(spec, cache_dir: Path | None = None, *, loaded: LoadedModel | None = None,
              progress: PhaseProgress | None = None, should_cancel: Callable[[], bool] | None = None,
              force: bool = False, batch_size: int = 4, stream: bool = False, tuning: dict | None = None) -> Path:
    """Prune a copy of the dense model as ``spec`` says and store it as a run (``_make_run``); return the run folder.
    Two identical prunes at once (two workers, a CLI call beside a job) do the work once: the second waits for the
    first's lock (``CacheLayout.lock``) and then takes its run; with ``force`` it prunes again after it."""
    layout = CacheLayout.at(cache_dir)
    folder = layout.run(spec.key())
    if (folder / MANIFEST).is_file() and not force:
        return folder

    def waiting():
        if progress:
            progress("waiting for the same prune in another process", 0, 1)

    with exclusive(layout.lock(spec.key()), on_wait=waiting) as waited:
        if waited and (folder / MANIFEST).is_file() and not force:
            return folder
        return _make_run(spec, cache_dir, loaded=loaded, progress=progress, should_cancel=should_cancel, force=force,
                         batch_size=batch_size, stream=stream, tuning=tuning)


def _make_run(spec, cache_dir: Path | None = None, *, loaded: LoadedModel | None = None,
              progress: PhaseProgress | None = None, should_cancel: Callable[[], bool] | None = None,
              force: bool = False, batch_size: int = 4, stream: bool = False, tuning: dict | None = None) -> Path:
    """Prune a copy of the dense model as ``spec`` (a ``PruneSpec``) says and store it as a run; return the run
    folder.

    ``stream`` (when no ``loaded`` model is passed): read each decoder block from the checkpoint when its turn
    comes and write it, pruned, straight into the run's safetensors shards (``pruner.model.streaming``), so that neither
    the dense nor the pruned model is ever whole in memory. The pruned weights are the same as in memory.

    The allocation reads only what its allocator needs (``Allocator.needs``): the model's layout or weights, the
    dense statistics (cached, else a statistics pass first), or a learned allocation (learned first when missing,
    through ``pruner.engine.artifacts.learn_allocation``, the same function the learn request runs). An existing run of the
    same spec is returned as it is unless ``force``. The folder appears only when complete. ``tuning``: how the
    allocator's parameters were chosen (``pruner.predictor.tuning.tune_parameters``), kept in the manifest.
    """
    import copy

    from pruner.engine.prune import EXPERT_FALLBACK_METHOD, MIN_ROUTED_TOKENS, layer_targets, prune_model
    from pruner.methods import METHODS, NM

    layout = CacheLayout.at(cache_dir)
    folder = layout.run(spec.key())
    if (folder / MANIFEST).is_file() and not force:
        return folder
    phase = (lambda name: (lambda d, t: progress(name, d, t))) if progress else (lambda name: None)
    t_start = time.perf_counter()
    _start_peak_memory()
    # memory is planned before anything is loaded: a prune that cannot fit is refused with the numbers
    allocator = ALLOCATORS[spec.allocator]
    streamed = stream and loaded is None
    learning = allocator.learned and cached_learned(spec.stats_spec, spec.allocator, spec.sparsity,
                                                    spec.allocator_params, cache_dir) is None
    plan = plan_for_spec(spec, cache_dir, batch_size=batch_size, streamed=streamed,
                         learning=learning_kind(spec.allocator, spec.allocator_params) if learning else False)
    check_fits(plan, ways=prune_ways_out(streamed=streamed, offloaded=spec.model.offload_activations,
                                         device=plan.device))
    check_writable(layout.runs, needs_bytes=plan.writes, what="the runs folder")
    base = loaded if loaded is not None else load_model(spec.model, cache_dir, stream=stream)
    # weights of the blocks that nothing here can prune: refused by name unless the spec says to leave them dense
    unsupported = unsupported_weights(find_blocks(base.model)[1])
    if unsupported and not spec.leave_unsupported_dense:
        raise ValueError(unsupported_message(unsupported, base.info.get("architecture", "the model")))
    stats = load_cached_stats(spec.stats_spec, cache_dir)
    # the dense statistics pass runs only for an allocator that reads them (uniform and ER read the layout,
    # AlphaPruning the weights); cached statistics serve every allocator. A learned allocator collects them in its
    # own learning pass when they are missing (pruner.engine.besa.StatsAndBesaObserver)
    # (an expert split other than 'uniform' reads them too: each expert's outliers or routed tokens)
    needs_stats = allocator.needs == NEEDS_STATISTICS or spec.expert_split != "uniform"
    stats_pass = stats is None and needs_stats and not allocator.learned
    # tokenized once, for the statistics pass (when it runs) and for pruning
    needs_tokens = METHODS[spec.method].needs_inputs or stats_pass or allocator.learned
    tokens = calibration_tokens(base.tokenizer, spec.calib) if needs_tokens else None
    t0 = time.perf_counter()
    if stats_pass:
        stats = get_stats(spec.stats_spec, cache_dir, loaded=base, tokens=tokens, progress=phase("statistics"),
                          batch_size=batch_size)
    source = "statistics pass" if stats_pass else "cached statistics" if stats is not None else f"model {allocator.needs}"
    if stats is None and not allocator.learned:
        stats_or_layout = ModelLayout.of(base.model, weights=allocator.needs == NEEDS_WEIGHTS,
                                         blocks=base.block_store(), device=base.device)
    else:
        stats_or_layout = stats
    t_stats = time.perf_counter() - t0
    learned, t_learn = None, 0.0
    if allocator.learned:
        t0 = time.perf_counter()
        result = learn_allocation(spec.stats_spec, spec.allocator, spec.sparsity, spec.allocator_params, cache_dir,
                                  loaded=base, tokens=tokens, stats=stats, progress=phase("learn allocation"),
                                  should_cancel=should_cancel, batch_size=batch_size)
        if stats is None:  # collected in the learning pass and cached there
            stats_or_layout = stats = load_cached_stats(spec.stats_spec, cache_dir)
            source = "statistics collected in the learning pass"
        learned, t_learn = learned_layer_sparsity(result, stats), time.perf_counter() - t0
    alloc = with_expert_split(allocate(spec.allocator, stats_or_layout, spec.sparsity, learned=learned,
                                       **spec.allocator_params), stats, spec.expert_split, **spec.expert_params)
    nm = NM.parse(spec.nm) if spec.nm else None
    targets = layer_targets(alloc.layer_sparsity,
                            list(zip(stats_or_layout.layer_block.tolist(), stats_or_layout.layer_names)), nm)
    # A model the caller passed in (e.g. the dashboard's cached dense model) is never modified: prune a copy.
    # One this function loaded itself is pruned in place, which saves a model's worth of memory; a streamed one
    # holds only a skeleton (its blocks come from the checkpoint and go to the run's shards).
    model = copy.deepcopy(base.model) if loaded is not None else base.model
    with atomic_dir(folder) as tmp:  # a streamed prune writes its shards here as it goes: no partial run appears
        writer = None
        if base.streamed:
            from pruner.model.streaming import ShardWriter

            writer = ShardWriter(tmp)
        t0 = time.perf_counter()
        report = prune_model(model, tokens, spec.method, targets, spec.scope, base.device, batch_size,
                             progress=phase("prune"), should_cancel=should_cancel, method_params=spec.method_params,
                             blocks=base.block_store(writer), offload=base.spec.offload_activations)
        t_prune = time.perf_counter() - t0
        manifest = {
            "key": spec.key(),
            "label": spec.label(),
            "spec": spec.identity(),
            "model_summary": model_summary(base),
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "allocation": alloc.to_dict(),
            "achieved": {
                # over the weights the method pruned (the allocation's denominator) ...
                "overall": report.overall(),
                "block": report.block_achieved().tolist(),
                # ... and over every parameter of the decoder blocks (norms, biases, routers, weights left dense)
                "decoder_overall": report.decoder_overall(),
                "decoder_block": report.decoder_block(),
                **({"expert_fallback": {"min_routed_tokens": MIN_ROUTED_TOKENS, "method": EXPERT_FALLBACK_METHOD,
                                        "per_block": report.fallbacks_per_block()}}
                   if any(is_expert_unit(l.name) for l in report.layers) else {}),
                "layers": [vars(l) for l in report.layers],
            },
            **({"left_dense_unsupported": unsupported} if unsupported else {}),
            # where the allocation's inputs came from: cached statistics, a statistics pass run now, or the model
            "allocation_inputs": source,
            **({"tuning": tuning} if tuning else {}),
            "execution": _execution(base),
            "timings_s": {"statistics": round(t_stats, 2),
                          **({"learn_allocation": round(t_learn, 2)} if learned is not None else {}),
                          "prune": round(t_prune, 2)},
            "metrics": {},
        }
        t0 = time.perf_counter()
        if writer is not None:
            from pruner.model.streaming import outside_blocks_state

            writer.add(outside_blocks_state(model))
            writer.close()
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        manifest["memory"] = {**_peak_memory(), "planned_peak_gb": round(plan.total / 2**30, 3),
                              "plan_gb": {k: round(v / 2**30, 3) for k, v in plan.parts.items()},
                              **({"planned_device_peak_gb": round(plan.device_total / 2**30, 3),
                                  "device_plan_gb": {k: round(v / 2**30, 3) for k, v in plan.device_parts.items()}}
                                 if plan.device_parts else {})}
        manifest["timings_s"]["save"] = round(time.perf_counter() - t0, 2)
        manifest["timings_s"]["total"] = round(time.perf_counter() - t_start, 2)
        manifest[FILES_FIELD] = weight_records(tmp)  # what every later read of the weights is checked against
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    read_run(folder)  # fail loudly if the folder is not complete
    return folder


def load_run(folder: Path, device: str = "cpu"):
    """(model, tokenizer) of a stored run, in eval mode. A LoRA-recovered run is its pruned base weights with the
    adapters attached (not merged) through peft."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_weights(folder)
    from pruner.model.streaming import MODEL_BUILD_LOCK

    with MODEL_BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    adapters = Path(folder) / LORA_SUBFOLDER
    if (adapters / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapters).eval().requires_grad_(False)
    return model.to(device), AutoTokenizer.from_pretrained(folder)


def recover_run(parent_folder: Path, spec, data_dir: str | None, cache_dir: Path | None = None, *,
                device: str = "cpu", progress: PhaseProgress | None = None,
                should_cancel: Callable[[], bool] | None = None, force: bool = False) -> Path:
    """LoRA-recover a stored pruned run (``spec``: a ``pruner.engine.recover.RecoverSpec``) and store the result as a new
    run linked to its parent: the parent's files (hard-linked where possible, else copied), the adapters in
    ``lora/``, and a manifest with the parent's key and the training curve. Returns the new run's folder."""
    import os
    import shutil

    from pruner.engine.recover import RECOVER_SEED_OFFSET, train_lora
    from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix
    from pruner.specs import CalibSpec
    from pruner.store.formats import stable_hash

    parent = read_run(parent_folder).raw  # a manifest that cannot be read names the run
    if "recovery" in parent:
        raise ValueError(f"run {parent['key']} is already a LoRA recovery; recover its parent {parent['parent']} "
                         f"instead")
    if spec.parent != parent["key"]:
        raise ValueError(f"the recovery spec names run {spec.parent}, but the folder holds run {parent['key']}")
    key = stable_hash(spec.identity())
    folder = CacheLayout.at(cache_dir).run(key)
    if (folder / MANIFEST).is_file() and not force:
        return folder
    from transformers import AutoConfig

    check_whole_model(AutoConfig.from_pretrained(parent_folder), "training", f"run {parent['key']}",
                      batch_size=spec.batch, seqlen=spec.seqlen, device=resolve_device(device).type,
                      ways=["a shorter --train-seqlen", "a smaller --train-batch"])
    t0 = time.perf_counter()
    _start_peak_memory()
    model, tokenizer = load_run(parent_folder, device)
    c = parent["spec"]["calib"]
    calib = CalibSpec(dataset=c["dataset"], nsamples=spec.steps * spec.batch, seqlen=spec.seqlen,
                      seed=c["seed"] + RECOVER_SEED_OFFSET, data_dir=data_dir)
    tokens = calibration_tokens(tokenizer, calib)
    phase = (lambda d, t: progress("LoRA steps", d, t)) if progress else None
    peft_model, losses = train_lora(model, tokens, spec, seed=calib.seed, device=device, progress=phase,
                                    should_cancel=should_cancel)
    seconds = time.perf_counter() - t0
    # the base weights were frozen: their zeros must be exactly the parent's
    zeros = sum(int((weight_matrix(l) == 0).sum()) for b in find_blocks(peft_model.get_base_model())[1]
                for name, l in prunable_layers(b).items() if "lora_" not in name)  # base layers, not the adapters
    expected = sum(round(l["achieved"] * l["numel"]) for l in parent["achieved"]["layers"])
    if zeros != expected:
        raise RuntimeError(f"LoRA training changed the pruned weights ({zeros} zeros, the parent has {expected})")
    tail = max(1, len(losses) // 10)
    manifest = {
        **{k: parent[k] for k in ("model_summary", "allocation", "achieved") if k in parent},
        "key": key,
        "label": f"{parent['label']} + {spec.label()}",
        "parent": parent["key"],
        "spec": {**parent["spec"], **spec.identity()},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recovery": {
            "settings": spec.identity()["recover"], "data": calib.identity(), "seconds": round(seconds, 2),
            "trainable_params": sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n),
            "losses": losses, "loss_first": sum(losses[:tail]) / tail, "loss_last": sum(losses[-tail:]) / tail,
            "merged": False,
        },
        "timings_s": {"recover": round(seconds, 2)},
        "memory": _peak_memory(),
        "metrics": {},
    }
    with atomic_dir(folder) as tmp:
        for path in Path(parent_folder).iterdir():
            if path.is_file() and path.name != MANIFEST:
                try:
                    os.link(path, tmp / path.name)  # the same bytes: share them
                except OSError:
                    shutil.copy2(path, tmp / path.name)
        peft_model.save_pretrained(tmp / LORA_SUBFOLDER)
        manifest[FILES_FIELD] = weight_records(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Stored runs, typed


