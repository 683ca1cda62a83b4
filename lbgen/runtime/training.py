"""What the training stages (finetune, pretrain) share: the Ray Train driver, metrics log, resume guard, GPU choice.

A stage's output directory holds `config.yaml` and `metrics.jsonl`, and re-running into
it resumes only when the settings that define the run's content are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path

from lbgen.config import Config, ConfigError, from_dict, load_yaml
from lbgen.runtime import resources
from lbgen.runtime.locks import check_free


class CheckpointError(ConfigError):
    """A checkpoint file lbgen would resume from is refused or unreadable; the message names it."""


def load_train_state(path: Path, device) -> dict:
    """Optimiser/scheduler state written by `torch.save`, loaded with `weights_only=True`.

    A file holding anything but tensors and plain containers (a pickle that would run code) is
    refused with a CheckpointError; nothing in it is executed.
    """
    import pickle

    import torch

    from lbgen.models.hub import refusal_reason

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint file {path} refused: it holds objects other than tensors and plain "
                              f"containers ({refusal_reason(err)}); lbgen never unpickles those. "
                              "Remove that checkpoint or use another --output") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None


def load_tensors(path: Path, device) -> dict:
    """A safetensors checkpoint file; a damaged or foreign file -> CheckpointError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except Exception as err:  # noqa: BLE001  safetensors raises its own error types for a bad header
        raise CheckpointError(f"checkpoint file {path} is not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None


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


def umask_mode(path: Path) -> Path:
    """Give a final output file the mode the user's umask asks for, and return it.

    safetensors creates its files 0600: a LoRA or backbone on shared storage would be unreadable
    to a teammate, unlike every other file a run writes.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return Path(path)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`"key.path: old -> new"` for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def use_gpu(setting: bool | None) -> bool:
    """A stage's `use_gpu` setting; null means: GPUs when the attached Ray cluster has any."""
    import ray

    if setting is not None:
        return setting
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def check_output_dir(path: str | Path, field: str) -> None:
    """Refuse an output that cannot become a writable directory, before anything is written.

    `field` names the setting in the message (e.g. "generate.output"). Object-store URIs pass.
    """
    from lbgen.data.storage import is_uri

    if is_uri(path):
        return
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field} {path}: exists and is not a directory")
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{field} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{field} {path}: {ancestor} is not writable")
    check_free(path)  # another command writing there: refused now, not after Ray starts


def check_resumable(
    output: Path, cfg: Config, stage: str, sections: Collection[str], resumable: Collection[str], what: str | None = None
) -> None:
    """Refuse to resume into `output` if its `config.yaml` differs from `cfg` in `sections`.

    `what` names the run in the message (default: `stage`); fields of the `stage` section listed in
    `resumable` (paths within it: output, epochs, cluster.workers, ...: `lbgen.config.resumable_fields`)
    may change between runs. A run that failed before its first checkpoint (`checkpoints/checkpoint_*`)
    binds nothing.
    """
    saved = output / "config.yaml"
    if not saved.exists() or not any((output / "checkpoints").glob("checkpoint_*")):
        return
    def identity(config: dict) -> dict:
        kept = {section: config[section] for section in sections}
        kept[stage] = _without(config[stage], resumable)
        return kept

    old = dataclasses.asdict(from_dict(Config, load_yaml(saved), str(saved)))
    changed = differences(identity(old), identity(dataclasses.asdict(cfg)))
    if changed:
        raise ConfigError(f"{output} holds a {what or stage} run with other settings ({', '.join(changed)}); use another --output")


def _without(section: dict, paths: Collection[str], prefix: str = "") -> dict:
    """`section` less the (dotted) `paths`, nested sections included."""
    return {k: _without(v, paths, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in section.items() if prefix + k not in paths}


def run_config(output: Path, max_failures: int):
    """Ray Train's `RunConfig` of a stage: checkpoints under `output/checkpoints`, the last 2 kept.

    A dead or failing worker (OOM, lost node) restarts the worker group from the last checkpoint
    up to `max_failures` times; Ray's default (0) would fail the whole run.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name="checkpoints", storage_path=str(output), checkpoint_config=CheckpointConfig(num_to_keep=2),
                     failure_config=FailureConfig(max_failures=max_failures))


def training_requests(scaling, reads_data: bool) -> list[resources.Request]:
    """What a training run holds at once: its workers' bundles, and a CPU for Ray Data's read and decode
    tasks when it streams a dataset (they run beside the workers)."""
    bundle = {"CPU": scaling.num_cpus_per_worker, "GPU": scaling.num_gpus_per_worker,
              **scaling.additional_resources_per_worker}  # accelerator_type:X among these
    requests = [resources.Request("training worker(s)", scaling.num_workers, bundle)]
    if reads_data:
        requests.append(resources.Request("data task slot", 1, {"CPU": 1}))
    return requests


def fit(train_loop: Callable[[dict], None], loop_config: dict, cfg: Config, stage: str, progress, datasets: dict | None = None):
    """The Ray Train driver of a training stage (finetune, pretrain); returns the `Result` of the last checkpoint.

    `stage` names the config section (its `output` and `cluster`: `workers`, `use_gpu`, `cpus_per_worker`,
    `accelerator_type` and `max_failures`); `progress` is the `MetricsProgress` bar that follows `output/metrics.jsonl`
    while the workers train. The same `train_loop` runs in 1 or N DDP workers. A cluster that cannot hold
    the workers is refused (after up to `resource_wait_s` for an autoscaling one to grow): Ray Train would
    wait for them forever.
    """
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    output, cluster = Path(getattr(cfg, stage).output), getattr(cfg, stage).cluster
    scaling = ScalingConfig(num_workers=cluster.workers, use_gpu=use_gpu(cluster.use_gpu),
                            resources_per_worker={"CPU": cluster.cpus_per_worker}, accelerator_type=cluster.accelerator_type)
    settings = ", ".join(f"{stage}.cluster.{name} (--{name.replace('_', '-')})" for name in ("workers", "cpus_per_worker", "use_gpu", "accelerator_type"))
    resources.require(stage, training_requests(scaling, bool(datasets)), settings, cfg.resource_wait_s)
    trainer = TorchTrainer(train_loop, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config(output, cluster.max_failures), datasets=datasets)
    with progress:
        return trainer.fit()


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
