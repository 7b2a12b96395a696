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


#: ``peak_rss_gb``'s second value: over what the peak was taken.
PEAK_SINCE_RESET = "since the job started"  # a worker's job, or a prune or recovery run
PEAK_SINCE_PROCESS = "since the process started"

_peak_reset = False


def reset_peak_rss() -> bool:
    """Start a new window for ``peak_rss_gb``: on Linux, writing 5 to /proc/self/clear_refs sets the kernel's peak
    resident size (VmHWM) to the current one. Without it a long-lived process (a job worker, the dashboard) would
    record, for every run, the peak of the heaviest job it ever ran: getrusage's ru_maxrss even survives ``exec``.
    False where the reset is not possible (not Linux, or refused)."""
    global _peak_reset
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    _peak_reset = True
    return True


def peak_rss_gb() -> tuple[float, str]:
    """(peak resident memory of this process in GiB, over what: ``PEAK_SINCE_RESET`` after a ``reset_peak_rss``
    that worked, else ``PEAK_SINCE_PROCESS``). VmHWM from /proc where it exists, getrusage's ru_maxrss elsewhere
    (KiB on Linux; bytes on macOS)."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        return round(kib / 2**20, 3), (PEAK_SINCE_RESET if _peak_reset else PEAK_SINCE_PROCESS)
    except (OSError, StopIteration, ValueError):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(maxrss / (2**30 if sys.platform == "darwin" else 2**20), 3), PEAK_SINCE_PROCESS
