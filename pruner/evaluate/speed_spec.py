"""The shapes and timing protocol of a speed measurement (plain data, shared by the export and the timing)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pruner.store.formats import EXPORT_VERSION

#: Where a speed measurement runs: "deepsparse" (sparse kernels, end-of-life), "openvino" (8-bit sparse weight
#: decompression, AMX CPUs), "onnxruntime" (dense timings only), "auto" (DeepSparse where it can run, else ONNX Runtime).
SPEED_ENGINES = ("auto", "deepsparse", "onnxruntime", "openvino")

#: A measurement is the median of at least this many timed calls (after warm-up).
MIN_RUNS = 30


#: Dense and pruned take turns in this many rounds of timed calls (see speed_worker.time_interleaved). Timed one
#: after the other, repeated measurements of the same two graphs gave decode ratios from 1.46× to 1.56× on this
#: project's 2-core machine; in turns, every round sees the same machine.
DEFAULT_ROUNDS = 5


@dataclass(frozen=True)
class SpeedSpec:
    """Shapes and timing protocol. ``seqlen`` (T) is the prefill length and the decode step's KV-cache length."""

    batch: int = 1
    seqlen: int = 128
    threads: int | None = None  #: None: all logical CPUs of the machine
    warmup: int = 5
    runs: int = MIN_RUNS
    rounds: int = DEFAULT_ROUNDS  #: dense and pruned alternate in this many rounds of ⌈runs / rounds⌉ calls

    def __post_init__(self):
        if self.batch < 1:
            raise ValueError(f"batch must be ≥ 1, got {self.batch}")
        if self.seqlen < 1:
            raise ValueError(f"seqlen (T) must be ≥ 1, got {self.seqlen}")
        if self.threads is not None and not 1 <= self.threads <= (os.cpu_count() or 1):
            raise ValueError(f"threads must be between 1 and {os.cpu_count()} (this machine's CPUs), got {self.threads}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be ≥ 0, got {self.warmup}")
        if self.runs < MIN_RUNS:
            raise ValueError(f"runs must be ≥ {MIN_RUNS} (a median of fewer calls is too noisy), got {self.runs}")
        if not 1 <= self.rounds <= self.runs:
            raise ValueError(f"rounds must be between 1 and runs ({self.runs}), got {self.rounds}")

    @property
    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def shape_key(self) -> str:
        return f"v{EXPORT_VERSION}-b{self.batch}-t{self.seqlen}"
