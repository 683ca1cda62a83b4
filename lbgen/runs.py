"""Run directories shared by the training stages: the metrics log and the resume guard.

Moved out of `finetune.py` so that `pretrain` uses the same code: a stage's output
directory holds `config.yaml` and `metrics.jsonl`, and re-running into it resumes
only when the settings that define the run's content are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path

from lbgen.config import Config, ConfigError, from_dict, load_yaml


class MetricsLog:
    """`metrics.jsonl`, one JSON line per step or epoch; on resume, lines past the checkpoint are dropped.

    Lines without a `step` (or with `phase: warmup`) belong to the run's start and are kept.
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = Path(path)
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if record.get("phase") == "warmup" or record.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """Append `record` with the wall-clock `time` it was written (throughput from the log)."""
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(
    output: Path, cfg: Config, stage: str, sections: Collection[str], resumable: Collection[str], what: str | None = None
) -> None:
    """Refuse to resume into `output` if its `config.yaml` differs from `cfg` in `sections`.

    `what` names the run in the message (default: `stage`); fields of the `stage` section listed in
    `resumable` (output, epochs, workers, ...) may change between runs. A run that failed before
    its first checkpoint (`checkpoints/checkpoint_*`) binds nothing.
    """
    saved = output / "config.yaml"
    if not saved.exists() or not any((output / "checkpoints").glob("checkpoint_*")):
        return
    old = _flatten(dataclasses.asdict(from_dict(Config, load_yaml(saved), str(saved))))
    new = _flatten(dataclasses.asdict(cfg))
    identity = tuple(f"{s}." for s in sections) + tuple(sections)
    changed = [
        f"{key}: {old[key]!r} -> {new[key]!r}"
        for key in new
        if (key in identity or key.startswith(identity))
        and not (key.startswith(f"{stage}.") and key.split(".", 1)[1] in resumable)
        and old[key] != new[key]
    ]
    if changed:
        raise ConfigError(f"{output} holds a {what or stage} run with other settings ({', '.join(changed)}); use another --output")


def report(metrics: dict, save: Callable[[Path], None] | None) -> None:
    """`ray.train.report` on every rank (it is collective); the rank passing `save` attaches a
    checkpoint that `save(directory)` writes."""
    import ray.train

    if save is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
