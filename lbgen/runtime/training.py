"""The Ray Train driver of the training stages (finetune, pretrain) and their checkpoint files.

`fit` runs one train loop in 1 or N workers after the resource pre-flight; `report` attaches a
checkpoint; `load_train_state` / `load_tensors` read checkpoint files back, refusing anything that
would unpickle code. Output-directory checks and the resume guard are `lbgen.runtime.outputs`'.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from lbgen.config import Config, ConfigError
from lbgen.errors import refusal_reason
from lbgen.runtime import resources


class CheckpointError(ConfigError):
    """A checkpoint file lbgen would resume from is refused or unreadable; the message names it."""


def load_train_state(path: Path, device) -> dict:
    """Optimiser/scheduler state written by `torch.save`, loaded with `weights_only=True`.

    A file holding anything but tensors and plain containers (a pickle that would run code) is
    refused with a CheckpointError; nothing in it is executed.
    """
    import pickle

    import torch

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
    scaling = ScalingConfig(num_workers=cluster.workers, use_gpu=resources.use_gpu(cluster.use_gpu),
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
