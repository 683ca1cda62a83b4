"""A driver-side progress bar that follows a stage's `metrics.jsonl`.

Ray workers' stdout arrives interleaved with Ray's own logs, which garbles a bar
drawn there. Rank 0 writes one JSON line per step instead, and the driver draws
the bar from that file on a background thread.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm


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
