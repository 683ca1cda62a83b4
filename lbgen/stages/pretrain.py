"""Stage 3, `pretrain`: a timm backbone trained on the generated shards with Ray Train + Ray Data.

Data path: `ray.data.read_parquet(shards)` -> `decode_batch` (row split and score
filter, decode, random resized crop + flip, uint8 out) in Ray Data tasks on CPU ->
`get_dataset_shard("train").iter_torch_batches` in each worker -> normalised on the
training device. `Pretrainer` is one worker's model, optimiser and schedule in
plain PyTorch; `train_loop_per_worker` is the thin Ray Train function around it;
`pretrain(cfg)` is the driver. Outputs: `backbone.safetensors` + `model.json`
(see `lbgen.models.backbones`), `metrics.jsonl` (one line per epoch), `config.yaml`,
`shards.json` and Ray Train checkpoints (re-running the command resumes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lbgen.config import Config, ConfigError, PretrainConfig, from_dict, require_local, resumable_fields, to_yaml
from lbgen.runtime import storage
from lbgen.data.classes import load_class_table
from lbgen.data.downstream import TransformedImages
from lbgen.data.shards import RowFilter, ShardError
from lbgen.data.sources import PlainParquetSource, TrainingData, open_training_data
from lbgen.data.transforms import DECODE_STAGES, DeviceDecoder, ImageTransform, Normalize
from lbgen.models.backbones import export_backbone
from lbgen.runtime import outputs, training
from lbgen.runtime.locks import OutputLock
from lbgen.runtime.precision import MixedPrecision
from lbgen.runtime.progress import MetricsLog, MetricsProgress, quiet_logger
from lbgen.runtime.seeds import derive_seed

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"  # inside checkpoints
TRAIN_STATE_FILE = "train_state.pt"  # optimiser, scheduler, scaler: loads with weights_only=True
STATE_FILE = "state.json"

# Settings a resumed run may change (marked resumable in the schema); any other difference means a different run.
RESUMABLE_FIELDS = resumable_fields(PretrainConfig)


# ---------------------------------------------------------------- data


def row_filter(cfg: Config) -> RowFilter:
    pt = cfg.pretrain
    return RowFilter(cfg.seed, pt.val_fraction, pt.min_clip_score, pt.min_iqa, pt.require_clip_agrees)


def image_transform(cfg: Config, train: bool) -> ImageTransform:
    pt = cfg.pretrain
    return ImageTransform(pt.image_size, train, tuple(pt.crop_scale), tuple(pt.crop_ratio), pt.hflip, pt.crop_pct)


def build_dataset(source: TrainingData, cfg: Config, split: str):
    """The Ray Dataset of `split` ("train": augmented, read order shuffled per epoch; "val": eval crops of
    rows read once)."""
    rows = row_filter(cfg)
    train = split == "train"
    ds = source.read(train, cfg.pretrain.read_block_rows, ["image", "label", "index", *rows.score_columns()])
    if not train:
        # The held-out rows (`val_fraction` of them) are read from the data once, here, and kept encoded in
        # Ray's object store: each epoch's validation decodes them again but never re-reads every shard's images.
        ds = ds.map_batches(rows.select, batch_format="pyarrow", fn_kwargs={"split": split})
        ds.context.enable_progress_bars = False  # the stage draws its own progress
        with quiet_logger("ray.data"):
            ds = ds.materialize()
    # One map stage after the read: Ray Data's per-operator reservations only idle CPUs here (on 2 CPUs the
    # decode tasks ran 1.44 at a time on average and their workers used 1.38 CPUs; 1.69 without; benchmarks/RESULTS.md).
    ds.context.op_resource_reservation_enabled = False
    return ds.map_batches(
        DECODE_STAGES[cfg.pretrain.decode_device],
        batch_format="pyarrow",
        batch_size=cfg.pretrain.decode_batch_size,
        fn_kwargs={"spec": image_transform(cfg, train), "rows": rows, "split": split},
    )


def train_batches(data, pt: PretrainConfig, device="cpu") -> Iterable[dict]:
    """One epoch of training batches {"image": (B, S, S, 3) uint8, "label"} from `data` (a worker's dataset shard,
    or a Ray Dataset): batches of `pt.batch_size` through a local shuffle buffer of `pt.shuffle_buffer` rows, the
    last partial one dropped; decoded on `device` when `pt.decode_device` is "cuda"."""
    return _batches(data, pt, device, local_shuffle_buffer_size=pt.shuffle_buffer or None, drop_last=True)


def eval_batches(data, pt: PretrainConfig, device="cpu") -> Iterable[dict]:
    """The held-out batches of `data`, in order, none dropped."""
    return _batches(data, pt, device)


def _batches(data, pt: PretrainConfig, device, **options) -> Iterable[dict]:
    if pt.decode_device == "cpu":
        return data.iter_torch_batches(batch_size=pt.batch_size, prefetch_batches=2, **options)
    decode = DeviceDecoder(pt.image_size, device)
    return map(decode, data.iter_batches(batch_size=pt.batch_size, batch_format="numpy", prefetch_batches=2, **options))


def steps_per_epoch(train_rows: int, cfg: Config) -> int:
    """Optimiser steps per epoch: full global batches (the last partial one is dropped)."""
    return train_rows // (cfg.pretrain.batch_size * cfg.pretrain.cluster.workers)


# ---------------------------------------------------------------- the model


def _all_reduce(values: list[float], device) -> list[float]:
    """Sum `values` over DDP ranks (identity in one process)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def create_backbone(pt: PretrainConfig, num_classes: int) -> nn.Module:
    """The timm model `pt.model` with `num_classes` outputs, randomly initialised; built for `pt.image_size`
    when its architecture fixes the input size (ViTs: timm's `fixed_input_size`), as export and load do."""
    import timm

    kwargs = {"num_classes": num_classes}
    if pt.drop_path:
        kwargs["drop_path_rate"] = pt.drop_path
    pretrained_cfg = timm.models.get_pretrained_cfg(pt.model)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = pt.image_size
    return timm.create_model(pt.model, pretrained=False, **kwargs)


def peak_lr(pt: PretrainConfig) -> float:
    """`pt.lr`, scaled to the global batch when it is given per `lr_base_batch` images."""
    if pt.lr_base_batch is None:
        return pt.lr
    return pt.lr * pt.batch_size * pt.cluster.workers / pt.lr_base_batch


class Pretrainer:
    """One worker's pre-training state: timm model, optimiser, warm-up + cosine schedule, mixup/cutmix; plain PyTorch."""

    def __init__(self, cfg: Config, num_classes: int, steps_per_epoch: int, device="cpu", wrap: Callable = lambda m: m,
                 rank: int = 0):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        pt = cfg.pretrain
        self.cfg, self.device, self.rank = cfg, torch.device(device), rank
        on_gpu = self.device.type == "cuda"
        self.precision = MixedPrecision(pt.cluster.mixed_precision, self.device)
        self.memory_format = torch.channels_last if on_gpu else torch.contiguous_format
        self.normalize = Normalize(pt.mean, pt.std, self.device)
        with torch.random.fork_rng(devices=[]):  # the same init on every rank and every run
            torch.manual_seed(derive_seed(cfg.seed, "pretrain", pt.model))
            self.model = create_backbone(pt, num_classes)
        self.model.to(self.device, memory_format=self.memory_format)
        self.model_ddp = wrap(self.model)
        self.optimizer = create_optimizer_v2(self.model, opt=pt.opt, lr=peak_lr(pt), weight_decay=pt.weight_decay)
        warmup = round(pt.warmup_epochs * steps_per_epoch)
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(1, pt.epochs * steps_per_epoch - warmup), lr_min=pt.min_lr,
            warmup_t=warmup, warmup_lr_init=pt.warmup_lr, warmup_prefix=True, t_in_epochs=False,
        )
        # Mixup/CutMix mix the normalised batch and make soft targets (label smoothing included).
        self.mixup = (Mixup(mixup_alpha=pt.mixup, cutmix_alpha=pt.cutmix, label_smoothing=pt.label_smoothing, num_classes=num_classes)
                      if pt.mixup or pt.cutmix else None)
        self.loss_fn = SoftTargetCrossEntropy() if self.mixup else nn.CrossEntropyLoss(label_smoothing=pt.label_smoothing)
        self.scaler = self.precision.grad_scaler()
        self.step = 0  # optimiser steps done, across resumes

    def start_epoch(self, epoch: int) -> None:
        """Seed this rank's random generators for `epoch`: torch's CPU and every CUDA device's (drop-path
        masks, dropout) and NumPy's global one (timm's mixup/cutmix), from (seed, rank, epoch).

        Ranks then draw different masks (one seed for all would repeat every mask on every GPU), and a
        run resumed from a checkpoint, which always falls at an epoch's end, draws exactly what the
        uninterrupted run drew: the generators' state is a function of the epoch, so none is saved.
        """
        seed = derive_seed(self.cfg.seed, "pretrain-epoch", self.rank, epoch)
        torch.manual_seed(seed)  # seeds every CUDA device too
        np.random.seed(seed % 2**32)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> normalised (B, 3, S, S) float on the device."""
        return self.normalize(images).contiguous(memory_format=self.memory_format)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch; returns the (detached) loss tensor without syncing the device."""
        self.model_ddp.train()
        inputs, targets = self._inputs(images), labels.to(self.device, non_blocking=True)
        if self.mixup:
            inputs, targets = self.mixup(inputs, targets)
        with self.precision.autocast():
            loss = self.loss_fn(self.model_ddp(inputs), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.scheduler.step_update(self.step)
        return loss.detach()

    def train_epoch(self, batches: Iterable[dict]) -> dict:
        """Train on every batch; returns loss and counts summed over ranks."""
        started = time.perf_counter()
        loss_sum, images = torch.zeros((), device=self.device), 0
        for batch in batches:
            loss_sum += self.train_step(batch["image"], batch["label"]) * len(batch["label"])
            images += len(batch["label"])
        total_loss, total_images = _all_reduce([float(loss_sum), images], self.device)
        seconds = time.perf_counter() - started
        return {"train_loss": total_loss / max(total_images, 1), "images": int(total_images), "epoch_time": seconds, "images_per_s": total_images / seconds}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict:
        """Loss and top-1 accuracy over `batches` (the held-out split), summed over ranks."""
        self.model_ddp.eval()
        loss_sum = correct = count = 0.0
        for batch in batches:
            labels = batch["label"].to(self.device)
            with self.precision.autocast():
                logits = self.model_ddp(self._inputs(batch["image"])).float()
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(1) == labels).sum())
            count += len(labels)
        loss_sum, correct, count = _all_reduce([loss_sum, correct, count], self.device)
        return {"val_loss": loss_sum / count, "val_acc": correct / count, "val_images": int(count)} if count else {}

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, directory: Path, epoch: int) -> None:
        directory = Path(directory)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, directory / MODEL_FILE)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        torch.save(state, directory / TRAIN_STATE_FILE)
        (directory / STATE_FILE).write_text(json.dumps({"epoch": epoch, "step": self.step}))

    def load(self, directory: Path) -> int:
        """Restore a checkpoint written by `save`; returns the number of epochs done."""
        directory = Path(directory)
        self.model.load_state_dict(training.load_tensors(directory / MODEL_FILE, self.device))
        # Onto the CPU: the optimiser moves its moments to each parameter's device itself, but keeps the
        # `step` counters where they come from; on a GPU, non-capturable AdamW would sync per parameter per step.
        state = training.load_train_state(directory / TRAIN_STATE_FILE, "cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        saved = json.loads((directory / STATE_FILE).read_text())
        self.step = int(saved["step"])
        self.scheduler.step_update(self.step)
        return int(saved["epoch"])


# ---------------------------------------------------------------- in one process


def memory_batches(images, cfg: Config, train: bool, epoch: int = 0, batch_size: int | None = None) -> Iterable[dict]:
    """Batches {"image", "label"} of an image set held in this process (`lbgen.data.downstream`'s sets) under the
    train or eval transform: train batches in a seeded order per epoch, the last partial one dropped."""
    data = TransformedImages(images, image_transform(cfg, train), seed=derive_seed(cfg.seed, "memory-crops"))
    data.epoch = epoch
    order = torch.Generator().manual_seed(derive_seed(cfg.seed, "memory-order", epoch))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size or cfg.pretrain.batch_size, shuffle=train,
                                         generator=order, drop_last=train)
    return ({"image": pixels, "label": labels} for pixels, labels in loader)


def pretrain_in_memory(cfg: Config, images) -> Pretrainer:
    """`cfg.pretrain`'s training of a backbone on an image set held in this process, without Ray or files: the
    `Pretrainer` loop each Ray Train worker runs, for tests and benchmarks that train on many small sets."""
    trainer = Pretrainer(cfg, len(images.classes), steps_per_epoch=len(images.targets) // cfg.pretrain.batch_size)
    for epoch in range(cfg.pretrain.epochs):
        trainer.start_epoch(epoch)
        trainer.train_epoch(memory_batches(images, cfg, True, epoch))
    return trainer


# ---------------------------------------------------------------- Ray Train


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: restore if a checkpoint exists, then one train + held-out pass per epoch."""
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = from_dict(Config, config["cfg"])
    pt = cfg.pretrain
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(pt.cluster.cpus_per_worker)))
    trainer = Pretrainer(cfg, config["num_classes"], config["steps_per_epoch"], ray.train.torch.get_device(),
                         ray.train.torch.prepare_model, rank)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            start = trainer.load(Path(directory))
    resumed_from = trainer.step
    metrics_log = MetricsLog(Path(pt.output) / "metrics.jsonl", trainer.step, trainer.precision.record()) if rank == 0 else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None

    if start >= pt.epochs:  # nothing left: hand the restored weights back for the export
        training.report({"epoch": start, "step": trainer.step}, partial(trainer.save, epoch=start) if rank == 0 else None)
    for epoch in range(start, pt.epochs):
        trainer.start_epoch(epoch)
        record = {"epoch": epoch + 1, **trainer.train_epoch(train_batches(train_shard, pt, trainer.device))}
        if val_shard is not None:
            record.update(trainer.evaluate(eval_batches(val_shard, pt, trainer.device)))
        record.update(step=trainer.step, lr=trainer.lr(), resumed_from_step=resumed_from)
        if metrics_log:
            metrics_log.write(record)
        done = epoch + 1
        last = done == pt.epochs or done % pt.cluster.checkpoint_every == 0
        training.report(record, partial(trainer.save, epoch=done) if rank == 0 and last else None)


def _absolute(cfg: Config) -> Config:
    """`cfg` with the output and data paths made absolute (workers may run elsewhere)."""
    pt = cfg.pretrain
    data = [storage.absolute(d) for d in pt.data]
    output = str(Path(pt.output).expanduser().resolve())
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(pt, data=data, output=output))


def check_data(cfg: Config) -> TrainingData:
    """Check `cfg.pretrain.data` (shards, an ImageFolder or plain Parquet) against the class table; count rows per split."""
    pt = cfg.pretrain
    table = load_class_table(cfg.classes)
    shards = open_training_data(pt.data, table, row_filter(cfg), skip_bad=pt.skip_bad_shards)
    if shards.bad:
        log.warning("%d bad shard(s) skipped (--skip-bad-shards); first: %s", len(shards.bad), shards.bad[0])
    if isinstance(shards, PlainParquetSource) and shards.class_sorted:
        log.warning("%s: its row groups hold %.1f classes each (rows in random order would hold %.1f), so training shuffles "
                    "all rows through Ray's object store each epoch; write the files class-mixed to skip that cost",
                    ", ".join(pt.data), shards.classes_per_group, shards.iid_classes_per_group)
    if steps_per_epoch(shards.train_rows, cfg) == 0:
        raise ShardError(
            f"{shards.train_rows} training rows after the split and score filters: fewer than one global batch "
            f"({pt.batch_size} x {pt.cluster.workers} workers) in {', '.join(pt.data)}"
        )
    return shards


def check_inputs(cfg: Config) -> TrainingData:
    """The checked shards of `cfg`; refuses bad shards or an unusable output before any worker starts."""
    import timm

    require_local(cfg, "pretrain")
    outputs.check_output_dir(cfg.pretrain.output, "pretrain.output")
    # Here, not in the workers: Ray Train would retry a worker's error `max_failures` times.
    if not timm.is_model(cfg.pretrain.model):
        raise ConfigError(f"pretrain.model: {cfg.pretrain.model!r} is not a timm model (see timm.list_models())")
    return check_data(_absolute(cfg))


def pretrain(cfg: Config, shards: TrainingData | None = None) -> Path:
    """Run (or resume) pre-training into `cfg.pretrain.output`; returns that directory.

    `shards`: what `check_inputs(cfg)` returned, when the caller has already checked
    (every shard's footer and labels are read once, not twice).
    """
    shards = shards or check_inputs(cfg)
    cfg = _absolute(cfg)
    pt = cfg.pretrain
    output = Path(pt.output)
    table = load_class_table(cfg.classes)
    with OutputLock(output):  # one writer per output
        outputs.check_resumable(output, cfg, "pretrain", ("classes", "seed", "pretrain"), RESUMABLE_FIELDS)
        (output / "config.yaml").write_text(to_yaml(cfg))
        (output / "shards.json").write_text(json.dumps(shards.to_json(), indent=2) + "\n")

        datasets = {"train": build_dataset(shards, cfg, "train")}
        if shards.val_rows:
            datasets["val"] = build_dataset(shards, cfg, "val")
        loop_config = {
            "cfg": dataclasses.asdict(cfg),
            "num_classes": len(table),
            "steps_per_epoch": steps_per_epoch(shards.train_rows, cfg),
            "has_val": bool(shards.val_rows),
        }

        def postfix(m: dict) -> str:
            val = f" val_acc={m['val_acc']:.3f}" if "val_acc" in m else ""
            return f"loss={m['train_loss']:.3f}{val} {m['images_per_s']:.0f} img/s"

        progress = MetricsProgress(output / "metrics.jsonl", pt.epochs, "pretrain", key="epoch", postfix=postfix)
        result = training.fit(train_loop_per_worker, loop_config, cfg, "pretrain", progress, datasets)
        with result.checkpoint.as_directory() as directory:
            export_checkpoint(Path(directory), cfg, output)
    return output


def export_checkpoint(checkpoint: Path, cfg: Config, output: Path) -> Path:
    """Write `backbone.safetensors` + `model.json` into `output` from a training checkpoint."""
    pt = cfg.pretrain
    table = load_class_table(cfg.classes)
    model = create_backbone(pt, len(table))
    model.load_state_dict(load_file(checkpoint / MODEL_FILE))
    state = json.loads((checkpoint / STATE_FILE).read_text())
    return export_backbone(
        model, output, timm_name=pt.model, class_ids=table.ids, class_names=table.names, image_size=pt.image_size,
        mean=pt.mean, std=pt.std, crop_pct=pt.crop_pct, extra={"epochs": state["epoch"], "steps": state["step"], "data": pt.data},
    )


def done_line(cfg: Config, output: Path) -> str:
    """What the CLI prints when pre-training is done."""
    return f"pre-trained backbone: {output / 'backbone.safetensors'} (+ model.json)"


def is_complete(directory: Path) -> bool:
    """Whether `directory` holds a finished pre-training (its exported backbone)."""
    return (Path(directory) / "backbone.safetensors").exists()
