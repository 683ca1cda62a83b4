"""What the benchmark scripts share: timestamped progress on stderr, the header of their JSON
documents, and a peak-memory sampler (this process's RSS, or the PSS of this process and its
descendants, Ray's processes among them).

The scripts run as `python benchmarks/<name>.py`, so this directory is on their `sys.path`.
"""

from __future__ import annotations

import datetime
import logging
import sys
import threading
import time
from collections.abc import Callable

import psutil

GiB = 2**30

# Quiet before any script imports diffusers or peft (ENVIRONMENT.md): bitsandbytes warns about its CPU kernels.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def log(message: str) -> None:
    """One timestamped progress line on stderr (stdout may carry the script's JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def json_header(**fields) -> dict:
    """What every benchmark's JSON document starts with: when, with which torch, how it was called; then `fields`."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        **fields,
    }


def own_rss() -> int:
    """Resident set size of this process, in bytes."""
    return psutil.Process().memory_info().rss


def tree_pss() -> int:
    """Summed proportional set size of this process and all its descendants (Ray's raylet, GCS, workers), in bytes."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            pass  # a process that just exited
    return total


class PeakSampler:
    """The peak of `measure()` (bytes), sampled every `interval` s in a thread while in the `with` block."""

    def __init__(self, measure: Callable[[], int] = own_rss, interval: float = 0.2):
        self.measure, self.interval, self.peak = measure, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.measure())
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
