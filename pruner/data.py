"""Evaluation and calibration text, from a local data folder or from the hub.

The local folder has the layout of ``../shared/data`` (see its README)::

    wikitext2/wiki.test.raw, wikitext2/wiki.valid.raw   WikiText-2 raw
    c4/c4_sample_text.jsonl                            C4 documents, one JSON object with "text" per line

``data_dir=None`` means the hub: ``wikitext``/``wikitext-2-raw-v1`` and one explicit shard of ``allenai/c4``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pruner.core.memory import return_freed_memory
from pruner.specs import CalibSpec

WIKITEXT_FILES = {"test": "wikitext2/wiki.test.raw", "validation": "wikitext2/wiki.valid.raw"}
C4_FILE = "c4/c4_sample_text.jsonl"
#: The hub shard used for C4 calibration (the old ``allenai--c4`` config no longer exists, so name a file).
C4_HUB_SHARD = "en/c4-train.00000-of-01024.json.gz"
#: How many documents of the hub shard form the calibration stream (about 2 M tokens, enough for 128 × 2048
#: windows with little overlap); the whole shard (356 k documents) would take minutes to tokenize.
C4_HUB_DOCUMENTS = 5000


class DataError(ValueError):
    """A data folder or file is missing or malformed."""


def _require(data_dir: str | Path, relative: str) -> Path:
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(
            f"data directory {folder} does not exist; pass --data-dir pointing at a folder laid out like "
            f"../shared/data (wikitext2/, c4/, ...)"
        )
    path = folder / relative
    if not path.is_file():
        raise DataError(f"data directory {folder} has no {relative}; expected the layout of ../shared/data")
    return path


def _hub_dataset(path: str, **kwargs):
    """``datasets.load_dataset(path, **kwargs)``; ``DataError`` in one line when the hub cannot be reached (found out
    in seconds, not after a minute of retries) or the load fails."""
    import datasets

    from pruner.model.catalogue import HUB_OFFLINE_SETTINGS, hub_unreachable

    why = hub_unreachable()
    if why is not None and why.split()[0] not in HUB_OFFLINE_SETTINGS:  # (offline on purpose: the cache is read)
        raise DataError(f"the hub cannot be reached to read {path} ({why}): use a local data folder (--data-dir PATH "
                        f"or $PRUNER_DATA_DIR, laid out like ../shared/data), or set HF_DATASETS_OFFLINE=1 to read "
                        f"what the Hugging Face cache already holds")
    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as err:  # the hub's and the cache's many error types: one line naming the dataset
        first = (str(err).strip().splitlines() or [""])[0].rstrip(":")
        raise DataError(f"hub dataset {path} could not be read ({type(err).__name__}: {first})") from err


def wikitext2_lines(split: str = "test", data_dir: str | Path | None = None) -> list[str]:
    """WikiText-2 raw rows as the hub dataset gives them: each line keeps its newline, blank lines are ''."""
    if split not in WIKITEXT_FILES:
        raise ValueError(f"WikiText-2 split must be one of {', '.join(WIKITEXT_FILES)}; got {split!r}")
    if data_dir is None:
        return list(_hub_dataset("wikitext", name="wikitext-2-raw-v1", split=split)["text"])
    path = _require(data_dir, WIKITEXT_FILES[split])
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line if line.strip() else "" for line in f]


def wikitext2_text(split: str = "test", data_dir: str | Path | None = None) -> str:
    """The evaluation text of the Wanda/SparseGPT/OWL protocol: the rows joined with two newlines."""
    return "\n\n".join(wikitext2_lines(split, data_dir))


def c4_documents(data_dir: str | Path | None = None) -> list[str]:
    """C4 calibration documents (local sample, or the first ``C4_HUB_DOCUMENTS`` of one hub shard)."""
    if data_dir is None:
        ds = _hub_dataset("allenai/c4", data_files={"train": C4_HUB_SHARD}, split="train")
        return list(ds.select(range(min(C4_HUB_DOCUMENTS, len(ds))))["text"])
    path = _require(data_dir, C4_FILE)
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: expected a JSON object with a 'text' string ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                got = (f"a {type(record).__name__}" if not isinstance(record, dict) else
                       "an object without 'text'" if "text" not in record else
                       f"an object whose 'text' is a {type(record['text']).__name__}")
                raise DataError(f"{path}:{number}: expected a JSON object with a 'text' string; got {got}")
            docs.append(record["text"])
    if not docs:
        raise DataError(f"{path} holds no documents")
    return docs


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents joined by blank lines and tokenized once: (n_tokens,) int64, no special tokens."""
    ids = tokenizer("\n\n".join(documents), add_special_tokens=False, return_tensors="pt").input_ids
    return ids[0]


def sample_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` consecutive tokens at seeded uniform random offsets: (nsamples, seqlen).

    The local C4 documents are shorter than a window, so windows are cut from the concatenated stream rather
    than from single documents (as the papers' loaders do with full-length C4).
    """
    n_tokens = int(stream.numel())
    if n_tokens < seqlen:
        raise DataError(f"calibration text has {n_tokens} tokens, fewer than seqlen={seqlen}; lower seqlen")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_tokens - seqlen + 1, size=nsamples)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


#: Token streams of the local files kept in this process, per (tokenizer, file): tokenizing the C4 sample takes
#: ~3 s here and every calibration set (any seed, size or spec) is cut from the same stream; WikiText-2's test or
#: validation split ~2 s, and every perplexity and damage table reads one. 8 bytes per token, 2–3 MB each.
_STREAMS: dict[tuple, torch.Tensor] = {}
_STREAMS_KEPT = 6


def _stream_key(tokenizer, path: Path) -> tuple | None:
    """Identifies a fast tokenizer by its full serialisation (vocabulary, merges, normaliser...) and the file by
    path, size and modification time; None when either cannot be identified (then nothing is kept)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    st = path.stat()
    return hashlib.sha256(backend.to_str().encode()).hexdigest(), str(path.resolve()), st.st_size, st.st_mtime_ns


def _kept_stream(key: tuple | None, tokenize: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``tokenize()``, or what it gave earlier in this process for ``key`` (None: never kept). A kept stream is
    returned as a copy, so no caller can change what the next one gets."""
    if key is not None and key in _STREAMS:
        return _STREAMS[key].clone()
    stream = tokenize()
    return_freed_memory()  # the tokenizer's work buffers would otherwise stay resident through pruning
    if key is not None:
        while len(_STREAMS) >= _STREAMS_KEPT:
            _STREAMS.pop(next(iter(_STREAMS)))
        _STREAMS[key] = stream.clone()
    return stream


def c4_token_stream(tokenizer, data_dir: str | Path | None) -> torch.Tensor:
    """The C4 calibration stream for ``tokenizer`` (``token_stream`` of ``c4_documents``), reused within the process
    for the local sample."""
    identity = _stream_key(tokenizer, _require(data_dir, C4_FILE)) if data_dir is not None else None
    return _kept_stream(None if identity is None else ("c4", *identity),
                        lambda: token_stream(tokenizer, c4_documents(data_dir)))


def wikitext2_ids(tokenizer, split: str = "test", data_dir: str | Path | None = None) -> torch.Tensor:
    """``wikitext2_text`` tokenized with the tokenizer's defaults, as the papers' code does (a BOS, if the tokenizer
    adds one, opens the stream): (n_tokens,) int64; reused within the process for the local files."""
    if split not in WIKITEXT_FILES:
        raise ValueError(f"WikiText-2 split must be one of {', '.join(WIKITEXT_FILES)}; got {split!r}")
    key = None
    if data_dir is not None:
        identity = _stream_key(tokenizer, _require(data_dir, WIKITEXT_FILES[split]))
        key = None if identity is None else ("wikitext2", split, *identity)
    return _kept_stream(key, lambda: tokenizer(wikitext2_text(split, data_dir), return_tensors="pt").input_ids[0])


def calibration_tokens(tokenizer, calib: CalibSpec) -> torch.Tensor:
    """The calibration set a spec names: (nsamples, seqlen) int64 token ids, reproducible for a given seed."""
    if calib.dataset != "c4":
        raise ValueError(f"calibration dataset must be 'c4'; got {calib.dataset!r}")
    return sample_windows(c4_token_stream(tokenizer, calib.data_dir), calib.nsamples, calib.seqlen, calib.seed)
