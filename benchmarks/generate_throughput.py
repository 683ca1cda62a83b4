"""Throughput and memory of `lbgen generate`, side by side with two baselines, in one run.

Same model, scheduler (DDPM), steps, CFG, batch size and resolution everywhere:

  (a) lbgen, 1 actor x 1 torch thread   vs  a bare diffusers loop (1 thread) that only samples    target >= 0.90
  (b) lbgen, 2 actors x 1 thread each   vs  the authors' style: per-class loop, one PNG file per
                                            image, synchronous; the faster of 1 thread and
                                            torch's default threads (all cores)                   target >= 1.2
  (c) lbgen 2 actors / 1 actor, 1 torch thread each                                               target >= 1.7
  (d) peak memory of lbgen at N and at 4N images, 1 actor (summed PSS: RSS with shared pages split
      between the processes mapping them, so the object store is not counted once per process) ratio <= 1.2

lbgen's rate is its marginal rate, (4N - N) images / (t(4N) - t(N)): fixed costs (actor start,
model load) cancel, as they do for the baselines, which load their model before the clock starts.
End-to-end rates are printed too.

Two things keep the harness from bending what it measures:
- Shards are the actors' unit of work. With a handful of them (tiny: 20 rows, so 2 shards at N), the
  first actor up can take them all at N and leave none to the second: t(N) grows and the 2-actor
  marginal rate comes out too high. `--rows-per-shard` (e.g. the batch size) gives every actor many
  shards, as at ImageNet scale (1300 shards over a few dozen GPUs), at the price of a shard write
  per batch, which real shards (1000 rows) amortise.
- Peak memory is sampled (once a second) only in the 1-actor arm, where (d) is taken. Reading PSS
  (/proc/PID/smaps_rollup of ~20 processes) costs ~40-80 ms of CPU a sample; at 4 samples a second it
  took ~0.25 of a core from the 2-actor arm on a 2-core machine.

The machine's speed drifts by ~10% over minutes (a shared host), more than some of the margins.
So the arms run in `--rounds` interleaved rounds, the order reversed every other round (A B C, C B A):
a linear drift then weighs every arm alike. Each rate is summed images / summed seconds over the
rounds. Usage:

    python benchmarks/generate_throughput.py --preset tiny --per-class 4 --steps 16 --rounds 2
    python benchmarks/generate_throughput.py --preset sd15-shape --per-class 2 --steps 50 --rounds 1   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from common import PeakSampler, tree_pss
from lbgen.config import Config, resolve
from lbgen.data.classes import load_class_table
from lbgen.models import create_generator
from lbgen.models.generator import create_scheduler
from lbgen.runtime.precision import weight_dtype
from lbgen.runtime.seeds import seeded_generator
from lbgen.stages.generate import generate


def run_lbgen(cfg: Config, per_class: int, workers: int, root: Path, measure_memory: bool) -> dict:
    gen = dataclasses.replace(cfg.generate, images_per_class=per_class, workers=workers, threads=1,
                              output=str(root / f"lbgen-w{workers}-n{per_class}"))
    import ray

    # A fresh local Ray per run: idle workers kept from an earlier run would count as memory here.
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with PeakSampler(tree_pss, interval=1.0) if measure_memory else contextlib.nullcontext() as memory:
            start = time.perf_counter()
            manifest = generate(dataclasses.replace(cfg, generate=gen), show_progress=False)
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    peak = {"peak_pss_gib": memory.peak / 2**30} if measure_memory else {}
    return {"images": manifest["totals"]["rows"], "seconds": seconds, **peak}


def load_pipe(cfg: Config, device: str):
    pipe = create_generator(cfg.model.generator, resolution=cfg.model.resolution, seed=cfg.seed, device=device,
                            torch_dtype=weight_dtype(cfg.generate.dtype))
    pipe.scheduler = create_scheduler(cfg.generate.scheduler, pipe.scheduler.config)
    return pipe


def bare_loop(cfg: Config, per_class: int, device: str) -> dict:
    """Only sampling: the diffusers pipeline called on batches of prompts, images kept as arrays."""
    pipe, gen = load_pipe(cfg, device), cfg.generate
    names = load_class_table(cfg.classes).names
    prompts = [gen.prompt_template.format(name=n) for n in names for _ in range(per_class)]
    start = time.perf_counter()
    for i in range(0, len(prompts), gen.batch_size):
        chunk = prompts[i : i + gen.batch_size]
        generators = [seeded_generator(cfg.seed, i + j, device=device) for j in range(len(chunk))]
        pipe(chunk, num_inference_steps=gen.steps, guidance_scale=gen.guidance, generator=generators,
             height=cfg.model.resolution, width=cfg.model.resolution, output_type="np")
    return {"images": len(prompts), "seconds": time.perf_counter() - start}


def authors_style(cfg: Config, per_class: int, device: str, root: Path) -> dict:
    """The authors' generator: for each class, batches of one prompt, each image saved as its own PNG, in turn."""
    pipe, gen = load_pipe(cfg, device), cfg.generate
    names = load_class_table(cfg.classes).names
    start, count = time.perf_counter(), 0
    for label, name in enumerate(names):
        folder = root / "authors" / f"{label:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for first in range(0, per_class, gen.batch_size):
            n = min(gen.batch_size, per_class - first)
            images = pipe(gen.prompt_template.format(name=name), num_images_per_prompt=n, num_inference_steps=gen.steps,
                          guidance_scale=gen.guidance, generator=seeded_generator(cfg.seed, label, first, device=device),
                          height=cfg.model.resolution, width=cfg.model.resolution).images
            for k, image in enumerate(images):
                image.save(folder / f"{first + k:06d}.png")
                count += 1
    return {"images": count, "seconds": time.perf_counter() - start}


def lbgen_arm(workers: int, measure_memory: bool = False):
    """The arm that times lbgen with `workers` actors at N and at 4N images."""
    def arm(cfg: Config, n: int, device: str, root: Path) -> dict:
        small, large = (run_lbgen(cfg, k, workers, root, measure_memory) for k in (n, 4 * n))
        return {"images": large["images"] - small["images"], "seconds": large["seconds"] - small["seconds"],
                "end_to_end_4N": large, "at_N": small}
    return arm


def baseline_arm(count: int, baseline):
    """The arm that times `baseline` at 4N images with `count` torch threads
    (the authors' script gets torch's default: all cores)."""
    def arm(cfg: Config, n: int, device: str, root: Path) -> dict:
        torch.set_num_threads(count)
        return baseline(cfg, 4 * n, device, root)
    return arm


ARMS = {
    "lbgen_1actor": lbgen_arm(1, measure_memory=True),
    "lbgen_2actors": lbgen_arm(2),
    "bare_loop_1thread": baseline_arm(1, lambda cfg, images, device, root: bare_loop(cfg, images, device)),
    "authors_style_1thread": baseline_arm(1, authors_style),
    "authors_style_all_threads": baseline_arm(os.cpu_count(), authors_style),
}


def rate(runs: list[dict]) -> float:
    return sum(r["images"] for r in runs) / sum(r["seconds"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd15-shape"])
    parser.add_argument("--per-class", type=int, default=4, help="images per class at N (4N runs 4x as many)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per generation call (default: the preset's)")
    parser.add_argument("--rows-per-shard", type=int, default=None, help="rows per shard (default: the preset's)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every arm (order reversed every other round)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    chosen = {"steps": args.steps, "batch_size": args.batch_size, "rows_per_shard": args.rows_per_shard}
    cfg = resolve(args.preset, overrides={"generate": {k: v for k, v in chosen.items() if v}})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"preset": args.preset, "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{os.cpu_count()}",
                     "steps": cfg.generate.steps, "batch_size": cfg.generate.batch_size, "resolution": cfg.model.resolution,
                     "rows_per_shard": cfg.generate.rows_per_shard, "classes": len(load_class_table(cfg.classes)), "rounds": args.rounds}
    runs: dict[str, list[dict]] = {name: [] for name in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in list(ARMS)[:: 1 if round_ % 2 == 0 else -1]:
                print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
                runs[name].append(ARMS[name](cfg, args.per_class, device, Path(tmp) / f"{name}-{round_}"))
    rates = {name: rate(r) for name, r in runs.items()}
    for workers in ("1actor", "2actors"):
        rates[f"lbgen_{workers}_end_to_end_4N"] = rate([r["end_to_end_4N"] for r in runs[f"lbgen_{workers}"]])
    memory = [r["end_to_end_4N"]["peak_pss_gib"] / r["at_N"]["peak_pss_gib"] for r in runs["lbgen_1actor"]]
    authors = max(rates["authors_style_1thread"], rates["authors_style_all_threads"])
    results["images_per_s"] = {k: round(v, 3) for k, v in rates.items()}
    results["runs"] = runs
    results["ratios"] = {
        "a_lbgen_over_bare (>=0.90)": round(rates["lbgen_1actor"] / rates["bare_loop_1thread"], 3),
        "b_lbgen_over_authors (>=1.2)": round(rates["lbgen_2actors"] / authors, 3),
        "c_2actors_over_1actor (>=1.7)": round(rates["lbgen_2actors"] / rates["lbgen_1actor"], 3),
        "d_peak_memory_4N_over_N (<=1.2)": round(max(memory), 3),  # the worst round
    }
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
