"""Fine-tuning step time under Ray Train (1 worker) / the same step in a plain loop.

Both sides run `Finetuner.train_step` on the same config and thread count, in one
process tree, one after the other (plain, Ray, plain again; the plain figure is
the mean of both). The Ray side is lbgen's real worker loop (`finetune()`),
including its metrics log and the checkpoints it reports every
`checkpoint_every` steps; its per-step time comes from the wall-clock stamps in
`metrics.jsonl`. Target: ratio <= 1.10.

    python benchmarks/finetune_overhead.py --preset tiny --steps 12
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lbgen.config import resolve
from lbgen.stages.finetune import Finetuner, finetune


def plain_step_time(cfg, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    ft = Finetuner(cfg)
    ft.train_step(0)  # warm-up: allocator, lazy inits
    started = time.perf_counter()
    for step in range(1, steps + 1):
        ft.train_step(step)
    return (time.perf_counter() - started) / steps


def ray_step_time(cfg, steps: int, threads: int) -> float:
    import dataclasses

    with tempfile.TemporaryDirectory() as tmp:
        cluster = dataclasses.replace(cfg.finetune.cluster, cpus_per_worker=float(threads))
        ft_cfg = dataclasses.replace(cfg.finetune, output=tmp, max_steps=steps + 1, cluster=cluster)
        finetune(dataclasses.replace(cfg, finetune=ft_cfg))
        stamps = [json.loads(line)["time"] for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()[1:]]
    # Step 0's line closes the warm-up step; the span after it covers `steps` steps.
    return (stamps[-1] - stamps[0]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    cfg = resolve(args.preset, overrides={"finetune": {"sample_every": 0}})
    plain_a = plain_step_time(cfg, args.steps, args.threads)
    under_ray = ray_step_time(cfg, args.steps, args.threads)
    plain_b = plain_step_time(cfg, args.steps, args.threads)
    plain = statistics.mean([plain_a, plain_b])
    print(f"preset={args.preset} steps={args.steps} threads={args.threads} checkpoint_every={cfg.finetune.cluster.checkpoint_every}")
    print(f"plain loop : {plain:.3f} s/step  (runs: {plain_a:.3f}, {plain_b:.3f})")
    print(f"Ray Train  : {under_ray:.3f} s/step  (1 worker, checkpoints included)")
    print(f"ratio Ray/plain = {under_ray / plain:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
