"""A stage's `metrics.jsonl`: the log rank 0 writes (`MetricsLog`) and the driver's progress bar that follows it.

Ray workers' stdout arrives interleaved with Ray's own logs, which garbles a bar
drawn there. Rank 0 writes one JSON line per step instead, and the driver draws
the bar from that file on a background thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm


class MetricsLog:
    """`metrics.jsonl`, one JSON line per step or epoch; on resume, lines past the checkpoint are dropped.

    Lines without a `step` (or with `phase: warmup`) belong to the run's start and are kept, unless
    the run starts over (`resume_step` 0, e.g. a worker died before the first checkpoint).
    `fields` go into every line: how the numbers were made (`device`, `precision`).
    """

    def __init__(self, path: Path, resume_step: int, fields: dict | None = None):
        self.path = Path(path)
        self.fields = dict(fields or {})
        kept = []
        if self.path.exists() and resume_step > 0:
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if record.get("phase") == "warmup" or record.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """Append `record` with the wall-clock `time` it was written (throughput from the log)."""
        with self.path.open("a") as f:
            f.write(json.dumps({**record, **self.fields, "time": time.time()}) + "\n")


class MetricsProgress:
    """Context manager: a tqdm bar advanced by `key` in the last line of `path`."""

    def __init__(self, path: Path, total: int, desc: str, key: str = "step", postfix: Callable[[dict], str] | None = None, interval: float = 0.5, unit: str | None = None):
        self.path, self.total, self.desc, self.key = Path(path), total, desc, key
        self.unit = unit or key  # what the bar counts: "step", "epoch", ...
        self.postfix = postfix
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self.bar = None

    def _last_record(self) -> dict | None:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if self.key in record:
                return record
        return None

    def _refresh(self) -> None:
        record = self._last_record()
        if record is None:
            return
        self.bar.n = min(int(record[self.key]), self.total)
        if self.postfix:
            self.bar.set_postfix_str(self.postfix(record), refresh=False)
        self.bar.refresh()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self._refresh()

    def __enter__(self) -> "MetricsProgress":
        self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._refresh()
        self.bar.close()


@contextmanager
def quiet_logger(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """`name`'s lines below `level` (Ray Data's per-dataset progress and timings) left out while the block
    runs, then its level as it was: a stage that draws its own progress does not silence the next stage."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
