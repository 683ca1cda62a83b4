"""Is pretrain's data path fast enough? Two ratios, one run.

1. Loader: images/s of the shard path (Ray Data: read_parquet -> decode_batch ->
   iter_torch_batches) over images/s of a plain PIL ImageFolder + torch DataLoader
   (torchvision's `ImageFolder` with its PIL loader, `RandomResizedCrop` +
   `RandomHorizontalFlip`) on the same images (the same JPEG bytes as files) and the
   same recipe. Target >= 1.0. For the record, a third loader, the same DataLoader
   running lbgen's own decode + transform (`decode_pixels`, `transform_pixels`),
   separates the decoder's share of the ratio from the pipeline's.
2. Trainer: seconds per training step fed by the shard path inside a real Ray Train
   worker (`TorchTrainer`, 1 worker, `cpus_per_worker` CPUs, the rest left to Ray Data)
   over seconds per step on synthetic tensors of the same shape, in the same worker.
   Target <= 1.15: the model is not starved.

    RAY_AUTH_MODE=disabled python benchmarks/loader_throughput.py [--images 2000 ...]

Prints a Markdown table (paste into benchmarks/RESULTS.md) and writes it to --report.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lbgen.config import resolve
from lbgen.data.downstream import render_shape
from lbgen.data.format import ARROW_SCHEMA, write_shard
from lbgen.data.transforms import decode_pixels, transform_pixels
from lbgen.runtime.seeds import derive_seed
from lbgen.stages.pretrain import Pretrainer, build_dataset, check_data, image_transform


def make_images(root: Path, count: int, size: int, shards: int, classes: int, quality: int) -> tuple[Path, Path]:
    """The same JPEGs twice: as Parquet shards (root/shards/data) and as an ImageFolder (root/folder)."""
    rows = []
    for index in range(count):
        label = index % classes
        seed = derive_seed(0, "bench", index)
        buffer = io.BytesIO()
        render_shape(label % 10, np.random.default_rng(seed), size).save(buffer, format="JPEG", quality=quality)
        data = buffer.getvalue()
        folder = root / "folder" / f"{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:06d}.jpg").write_bytes(data)
        rows.append({"image": {"bytes": data, "path": f"{index:06d}.jpg"}, "label": label, "class_id": f"c{label}",
                     "class_name": f"class {label}", "prompt": "", "seed": seed, "index": index, "width": size, "height": size,
                     "clip_score": 1.0, "clip_agrees": True, "iqa_score": 1.0, "generator": "bench"})
    for i in range(shards):
        table = pa.Table.from_pylist(rows[i::shards], schema=ARROW_SCHEMA)
        write_shard(table, root / "shards" / "data" / f"train-{i:05d}-of-{shards:05d}.parquet", row_group_rows=100)
    return root / "shards", root / "folder"


def plain_folder(root: Path, spec) -> torch.utils.data.Dataset:
    """The baseline: torchvision's ImageFolder (PIL loader) with the standard training transforms."""
    from torchvision import datasets
    from torchvision.transforms import v2

    recipe = v2.Compose([
        v2.RandomResizedCrop(spec.size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(spec.hflip),
        v2.PILToTensor(),
    ])
    return datasets.ImageFolder(str(root), transform=recipe)


class LbgenFolder(torch.utils.data.Dataset):
    """The same files through lbgen's decode + transform, in the same DataLoader (the decoder's share)."""

    def __init__(self, root: Path, spec):
        self.files = sorted(root.rglob("*.jpg"))
        self.spec = spec

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        rng = np.random.default_rng([i, os.getpid()])
        pixels = transform_pixels(decode_pixels(self.files[i].read_bytes()), self.spec, rng)
        return torch.from_numpy(pixels), int(self.files[i].parent.name)


def loader_rates(batches, epochs: int) -> dict[str, float]:
    """Per-epoch figures, averaged over `epochs` passes after one warm-up pass (workers started, files cached).

    `steady` counts images/s between the batches that end the first 20% and the first 90%
    of the epoch: the streaming rate that an epoch of 1.3 M images sees, free of both the
    start-up and what a pipeline prefetched while it started. `epoch` includes the
    pipeline's start-up; `startup_s` is that start-up (time to the first batch).
    """
    steady, whole, startup = [], [], []
    for epoch in range(epochs + 1):
        started, marks = time.perf_counter(), []
        for batch in batches():
            count = len(batch[1] if isinstance(batch, (list, tuple)) else batch["label"])
            marks.append((time.perf_counter(), count + (marks[-1][1] if marks else 0)))
        if epoch:
            total = marks[-1][1]
            (t0, n0), (t1, n1) = (next(m for m in marks if m[1] >= share * total) for share in (0.2, 0.9))
            steady.append((n1 - n0) / (t1 - t0))
            whole.append(total / (marks[-1][0] - started))
            startup.append(marks[0][0] - started)
    return {"steady": float(np.mean(steady)), "epoch": float(np.mean(whole)), "startup_s": float(np.mean(startup))}


def trainer_loop(config: dict) -> None:
    """In a Ray Train worker: step time on synthetic tensors, then fed by the dataset shard."""
    import ray.train

    from lbgen.config import Config, from_dict

    cfg = from_dict(Config, config["cfg"])
    pt, steps = cfg.pretrain, config["steps"]
    torch.set_num_threads(max(1, int(pt.cluster.cpus_per_worker)))
    trainer = Pretrainer(cfg, config["classes"], steps_per_epoch=steps)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (pt.batch_size, pt.image_size, pt.image_size, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, config["classes"], (pt.batch_size,), generator=g)

    def timed(batches) -> float:
        times, started = [], time.perf_counter()
        for i, (x, y) in enumerate(batches):
            trainer.train_step(x, y)
            now = time.perf_counter()
            if i >= 2:  # the first steps warm the allocator and the pipeline up
                times.append(now - started)
            started = now
        return float(np.mean(times))

    synthetic = timed((images, labels) for _ in range(steps))
    shard = ray.train.get_dataset_shard("train")
    fed = shard.iter_torch_batches(batch_size=pt.batch_size, drop_last=True, local_shuffle_buffer_size=pt.shuffle_buffer or None, prefetch_batches=2)
    with_data = timed((b["image"], b["label"]) for _, b in zip(range(steps), fed))
    # Result.metrics stays None without a checkpoint: hand the numbers back through a file.
    Path(config["result_file"]).write_text(json.dumps({"synthetic_step_s": synthetic, "data_step_s": with_data}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults are the real-scale workload: sd15-in1k writes 512 px JPEGs at quality 95, pretrain crops 224.
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--size", type=int, default=512, help="side of the stored JPEGs")
    parser.add_argument("--quality", type=int, default=95, help="their JPEG quality")
    parser.add_argument("--crop", type=int, default=224, help="training crop side")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes of the baseline")
    parser.add_argument("--epochs", type=int, default=3, help="timed passes per loader (after one warm-up)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--read-block-rows", type=int, default=128)
    parser.add_argument("--report", default=None, help="also write the Markdown table here")
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "steps.json"
        table_file = Path(tmp) / "classes.txt"
        table_file.write_text("".join(f"c{i} class {i}\n" for i in range(args.classes)))
        shards, folder = make_images(Path(tmp), args.images, args.size, args.shards, args.classes, args.quality)
        cfg = resolve("tiny", overrides={"pretrain": {
            "data": [str(shards)], "image_size": args.crop, "batch_size": args.batch_size, "val_fraction": 0.0,
            "crop_scale": [0.08, 1.0], "model": args.model, "cluster": {"cpus_per_worker": args.cpus_per_worker}, "shuffle_buffer": 1000,
            "decode_batch_size": 64, "read_block_rows": args.read_block_rows,
        }, "classes": str(table_file)})
        found = check_data(cfg)
        dataset = build_dataset(found, cfg, "train")
        ray_rate = loader_rates(lambda: dataset.iter_torch_batches(batch_size=args.batch_size, prefetch_batches=2), args.epochs)
        spec = image_transform(cfg, True)

        def folder_loader(images):
            return lambda: torch.utils.data.DataLoader(images, batch_size=args.batch_size, shuffle=True, num_workers=args.loader_workers)

        folder_rate = loader_rates(folder_loader(plain_folder(folder, spec)), args.epochs)
        lbgen_folder_rate = loader_rates(folder_loader(LbgenFolder(folder, spec)), args.epochs)

        trainer = TorchTrainer(
            trainer_loop,
            train_loop_config={"cfg": dataclasses.asdict(cfg), "steps": args.steps, "classes": args.classes, "result_file": str(result_file)},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": args.cpus_per_worker}),
            run_config=RunConfig(name="bench", storage_path=str(Path(tmp) / "ray")),
            datasets={"train": build_dataset(found, cfg, "train")},
        )
        trainer.fit()
        metrics = json.loads(result_file.read_text())
    cpus = int(ray.cluster_resources().get("CPU", 0))
    ray.shutdown()

    step_ratio = metrics["data_step_s"] / metrics["synthetic_step_s"]
    lines = [
        (
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, Ray with {cpus} CPUs, torch {torch.__version__}, "
            f"{args.images} JPEGs of {args.size} px (quality {args.quality}) -> random resized crop {args.crop} + flip, batch {args.batch_size}."
        ),
        "",
        "| measure | shard path (Ray Data) | baseline | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| loader images/s, steady state (shards / PIL ImageFolder DataLoader, {args.loader_workers} workers) | {ray_rate['steady']:.0f} | {folder_rate['steady']:.0f} | {ray_rate['steady'] / folder_rate['steady']:.2f} | >= 1.0 |",
        f"| loader images/s, whole epoch incl. start-up | {ray_rate['epoch']:.0f} | {folder_rate['epoch']:.0f} | {ray_rate['epoch'] / folder_rate['epoch']:.2f} | (info) |",
        f"| loader start-up per epoch, s (first batch) | {ray_rate['startup_s']:.2f} | {folder_rate['startup_s']:.2f} | | (info) |",
        f"| loader images/s, steady state (shards / the same DataLoader running lbgen's decode + transform) | {ray_rate['steady']:.0f} | {lbgen_folder_rate['steady']:.0f} | {ray_rate['steady'] / lbgen_folder_rate['steady']:.2f} | (info: the pipeline alone) |",
        f"| {args.model} train step s (with data / synthetic tensors, Ray Train worker with {args.cpus_per_worker:g} CPU) | {metrics['data_step_s']:.3f} | {metrics['synthetic_step_s']:.3f} | {step_ratio:.2f} | <= 1.15 |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.report:
        Path(args.report).write_text(table + "\n")


if __name__ == "__main__":
    main()
