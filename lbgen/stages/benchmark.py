"""`lbgen benchmark`: how fast generation runs on this machine's device with a config, and what the dataset costs.

One generation actor's work in this process, on the first GPU (else the CPU): `GenerateBatch`, the callable that
`generate` runs inside Ray Data, on the config's first planned batches. The model load and the first batch
(warm-up: CUDA kernels chosen, `torch.compile` when set) are reported apart from the steady batches after them.
From the steady rate it projects the whole dataset's GPU-hours (classes x images per class, one GPU), and its
cost at `--price-per-gpu-hour`. FLOPs per image are counted on the model itself (`torch.utils.flop_counter`), so
the achieved TFLOP/s and the share of the device's peak need no cost sheet.

    lbgen benchmark --preset sd15-in1k --classes imagenet1k --price-per-gpu-hour 2.5 --json bench.json
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from lbgen.config import Config, ConfigError
from lbgen.data.classes import ClassTable, load_class_table
from lbgen.data.plan import batch_rows, batches_of, shard_sizes

# Peak dense fp16/bf16 tensor TFLOP/s by GPU name (vendor data sheets, without sparsity), for "% of peak".
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0}


def check_inputs(cfg: Config) -> ClassTable:
    """The class table (what the projection counts), checked with the rest before any model loads."""
    from lbgen.models.generator import check_generator

    check_generator(cfg.model.generator)
    if cfg.benchmark.json and not Path(cfg.benchmark.json).resolve().parent.is_dir():
        raise ConfigError(f"benchmark.json: the folder of {cfg.benchmark.json} does not exist")
    return load_class_table(cfg.classes)


def timed_batches(cfg: Config, table: ClassTable, count: int) -> list[dict[str, np.ndarray]]:
    """The dataset's first `count` planned batches of `generate.batch_size` rows, as `GenerateBatch` takes them."""
    sizes = shard_sizes(len(table), cfg)
    items = batches_of(range(len(sizes)), sizes, cfg.generate.batch_size)[:count]
    rows = [batch_rows(item, names=table.names, ids=table.ids, cfg=cfg) for item in items]
    return [{key: np.array([row[key] for row in batch]) for key in batch[0]} for batch in rows]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(model, batch: dict[str, np.ndarray]) -> float:
    """FLOPs of one micro-batch through `model` (every denoising step, CFG and the VAE decode), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.cfg.generate.micro_batch
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model._sample([int(s) for s in batch["seed"][:size]], [str(p) for p in batch["prompt"][:size]])
    return counter.get_total_flops() / size


def largest_micro_batch(model, batch: dict[str, np.ndarray], limit: int = 256) -> int | None:
    """The largest micro-batch (doubling from the config's) that runs without exhausting GPU memory; None on a CPU."""
    if model.device.type != "cuda":
        return None
    original, size, fits = model.cfg, model.cfg.generate.micro_batch, None
    seeds, prompts = [int(batch["seed"][0])] * limit, [str(batch["prompt"][0])] * limit
    try:
        while size <= limit:
            model.cfg = dataclasses.replace(original, generate=dataclasses.replace(original.generate, micro_batch=size))
            try:
                with torch.no_grad():
                    model._sample(seeds[:size], prompts[:size])
            except torch.cuda.OutOfMemoryError:
                break
            fits, size = size, size * 2
    finally:
        model.cfg = original
        torch.cuda.empty_cache()
    return fits


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_tflops(cfg: Config, device: torch.device) -> float | None:
    """The device's peak dense TFLOP/s: the setting, else the GPU's data-sheet figure, else None."""
    if cfg.benchmark.peak_tflops:
        return cfg.benchmark.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def benchmark(cfg: Config, checked: ClassTable | None = None) -> dict:
    """Time generation with `cfg` on this machine's device; returns (and writes to `benchmark.json`) the figures."""
    from lbgen.stages.generate import GenerateBatch

    table = checked or check_inputs(cfg)
    gen, bench = cfg.generate, cfg.benchmark
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = timed_batches(cfg, table, bench.batches + 1)
    start = time.perf_counter()
    model = GenerateBatch(dataclasses.asdict(cfg), str(device))
    load_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for batch in batches:
        start = time.perf_counter()
        model(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    steady = batches[1:] or batches  # one batch asked for: timed with its warm-up
    images_per_s = sum(len(b["seed"]) for b in steady) / sum(times[1:] or times)
    flops = flops_per_image(model, batches[0])
    peak = peak_tflops(cfg, device)
    achieved = flops * images_per_s / 1e12
    total = len(table) * gen.images_per_class
    gpu_hours = total / images_per_s / 3600
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "generator": cfg.model.generator, "resolution": cfg.model.resolution, "steps": gen.steps,
        "scheduler": gen.scheduler, "dtype": gen.dtype, "micro_batch": gen.micro_batch, "batch_size": gen.batch_size,
        "load_s": round(load_s, 3), "warmup_s": round(times[0], 3),
        "steady_batches": len(steady), "images_per_s": round(images_per_s, 4),
        "peak_memory_bytes": peak_memory_bytes(device),
        "largest_micro_batch": largest_micro_batch(model, batches[0]) if bench.find_max_micro_batch else None,
        "flops_per_image": flops, "achieved_tflops": round(achieved, 4),
        "peak_tflops": peak, "percent_of_peak": round(100 * achieved / peak, 2) if peak else None,
        "dataset_images": total, "gpu_hours": round(gpu_hours, 3),
        "cost": round(gpu_hours * bench.price_per_gpu_hour, 2) if bench.price_per_gpu_hour else None,
    }
    if bench.json:
        Path(bench.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def done_line(cfg: Config, result: dict) -> str:
    """What the CLI prints: the steady rate, the projection and where the JSON went."""
    cost = f", cost {result['cost']:,.2f} at {cfg.benchmark.price_per_gpu_hour:g}/GPU-hour" if result["cost"] else ""
    peak = f" ({result['percent_of_peak']}% of {result['peak_tflops']:g})" if result["percent_of_peak"] is not None else ""
    lines = [
        f"{result['device']}: {result['images_per_s']} images/s steady over {result['steady_batches']} batch(es) "
        f"(model load {result['load_s']} s, warm-up batch {result['warmup_s']} s); "
        f"{result['flops_per_image'] / 1e12:.3g} TFLOPs/image, {result['achieved_tflops']} TFLOP/s{peak}; "
        f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB; largest micro-batch {result['largest_micro_batch']}",
        f"{result['dataset_images']:,} images: {result['gpu_hours']:,} GPU-hours on this device{cost}",
    ]
    if cfg.benchmark.json:
        lines.append(f"figures: {cfg.benchmark.json}")
    return "\n".join(lines)
