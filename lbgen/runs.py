"""Run directories shared by the training stages: the metrics log and the resume guard.

Moved out of `finetune.py` so that `pretrain` uses the same code: a stage's output
directory holds `config.yaml` and `metrics.jsonl`, and re-running into it resumes
only when the settings that define the run's content are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
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
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def check_resumable(
    output: Path, cfg: Config, stage: str, sections: Collection[str], resumable: Collection[str], what: str | None = None
) -> None:
    """Refuse to resume into `output` if its `config.yaml` differs from `cfg` in `sections`.

    `what` names the run in the message (default: `stage`); fields of the `stage` section listed in
    `resumable` (output, epochs, workers, ...) may change between runs.
    """
    saved = output / "config.yaml"
    if not saved.exists():
        return
    old = dataclasses.asdict(from_dict(Config, load_yaml(saved), str(saved)))
    new = dataclasses.asdict(cfg)
    old[stage] = {k: v for k, v in old[stage].items() if k not in resumable}
    new[stage] = {k: v for k, v in new[stage].items() if k not in resumable}
    for section in sections:
        if old[section] != new[section]:
            if isinstance(old[section], dict):
                diff = [k for k in new[section] if old[section].get(k) != new[section][k]]
                detail = ", ".join(f"{section}.{k}: {old[section].get(k)!r} -> {new[section][k]!r}" for k in diff)
            else:
                detail = f"{section}: {old[section]!r} -> {new[section]!r}"
            raise ConfigError(f"{output} holds a {what or stage} run with other settings ({detail}); use another --output")
