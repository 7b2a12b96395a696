"""Process memory housekeeping (no torch, no model)."""

from __future__ import annotations


def return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc only; elsewhere nothing to do).

    Freed memory otherwise stays in the allocator's arenas and counts in the resident size until the process ends:
    * each block of the calibration loop allocates and frees many differently sized buffers; without this the
      resident size grew by ~60 MB per block on SmolLM2 (fragmentation, not a leak: peak RSS of a stats pass 2.19
      GiB without, 1.13 GiB with);
    * tokenizing the calibration text at once (``pruner.data.calibration_tokens``) frees ~200 MB of the
      tokenizer's work buffers, ~130 MB of which stayed resident and added to every later peak.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
