"""Cost sheet of the paper's workload on the `sd15-shape` architectures, computed on a CPU.

What it measures (SD 1.5 UNet/VAE/text encoder and CLIP ViT-L/14 with random weights: the same
FLOPs and bytes as the real weights, which only change values, not shapes):

- generation: FLOPs per image at `--resolution` px and `--steps` DDPM steps with CFG (one UNet call
  on a batch of 2 per step), prompt encoding, VAE decode, and the scoring that `lbgen generate`
  does per image (CLIP image features at CLIP's 224 px, the IQA score);
- fine-tuning: FLOPs and peak memory of one `Finetuner.train_step` (per GPU worker) at `--batch`
  classes, K=`--grad-steps` of T=`--steps` steps recording a graph, LoRA on the paper's targets, in
  `--precision`, with and without gradient checkpointing; plus the discriminator step;
- pre-training: ResNet-50 train FLOPs per image at 224 px (forward + backward, counted);
- GPU-hours of the paper's ImageNet-1K run (preset `sd15-in1k`: its fine-tuning steps and workers
  with the discriminator's warm-up pass before them, 1.3 M images, 100 pre-training epochs) on an
  A100 and an H100 at `--utilization`, beside the public SD 1.5 generation speeds and the
  utilisation those speeds imply.

How: lbgen's own factories build the models on the meta device (no weights, no memory); they are
materialised as FakeTensors (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes and
devices but no data) and run through lbgen's own sampler and losses, twice: `FlopCounterMode` counts
the FLOPs of what runs (matmuls, convolutions, attention; elementwise work is not counted), and in a
separate pass `torch.distributed._tools.mem_tracker.MemTracker` follows every tensor alive, so its peak is what
`torch.cuda.max_memory_allocated` would show (no allocator fragmentation; the tensors CPU kernels
keep for backward, which for these ops, flash attention included, match the CUDA ones). The fine-tuning step
mirrors `Finetuner.train_step`, whose own code cannot run on fake tensors (it reads values:
`.item()`, data-dependent timestep lookups); each run of consecutive no-gradient UNet calls is
simulated once (they free what they allocate) and its FLOPs counted per call.

The estimate is checked against a real `Finetuner.train_step` on this CPU at a small geometry
(128 px, B=1, K=1, T=2): the tensors alive before the step plus the peak of the
allocations torch's profiler records during it, against the estimator's peak at that geometry.

`--measure-step` instead runs ONE real `Finetuner.train_step` at 512 px, K=2 of T=4, gradient
checkpointing, `--precision`, LoRA r128 on the paper's targets, batch 1 (a CPU cannot hold more in
reasonable time), and reports wall time, peak RSS, the profiler's peak allocations, the estimator's
prediction for that geometry, and where the time went (UNet, VAE, CLIP, IQA; forward and backward).

    python benchmarks/real_workload.py --json /tmp/cost.json         # 512 px, 50 steps: ~5 min, 2 of them the check
    python benchmarks/real_workload.py --resolution 128 --steps 4    # quick: ~4 min on a busy 2-core machine
    nice -n 10 python benchmarks/real_workload.py --measure-step --json /tmp/step.json   # long: tens of minutes
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch

from common import GiB, PeakSampler, json_header, log
from lbgen.config import resolve
from lbgen.stages.finetune import Finetuner
from workload_cost import GPU_PEAK_FLOPS, PUBLIC_GEOMETRY, paper_run, paper_run_hours, public_generation
from workload_counting import (
    Precision,
    build_fake_models,
    estimate_train_step,
    finetuner_resident_bytes,
    generation_flops,
    profiler_peak_bytes,
    train_flops_per_image,
)

TERA = 1e12
CHECK_GEOMETRY = {"resolution": 128, "batch": 1, "grad_steps": 1, "steps": 2}
# The geometry of --measure-step: the paper's resolution, as few steps as show the structure.
MEASURE_GEOMETRY = {"resolution": 512, "batch": 1, "grad_steps": 2, "steps": 4}


# ---------------------------------------------------------------- a real step on this CPU


def finetune_config(geometry: dict, precision: str, classes: str | None = None):
    """Preset sd15-shape at `geometry`, gradient checkpointing on; train_step is called directly, so no D warm-up."""
    overrides = {
        "model": {"resolution": geometry["resolution"]},
        "finetune": {"batch_size": geometry["batch"], "grad_steps": geometry["grad_steps"],
                     "num_steps": geometry["steps"], "cluster": {"mixed_precision": precision}, "gradient_checkpointing": True,
                     "d_warmup_passes": 0},
    }
    if classes:
        overrides["classes"] = classes
    return resolve("sd15-shape", overrides=overrides)


def real_step(cfg, timer_factory=None) -> dict:
    """One real `Finetuner.train_step(0)` on this CPU under torch's profiler (memory on)."""
    from torch.profiler import ProfilerActivity, profile

    log(f"building Finetuner (sd15-shape, {cfg.model.resolution} px, B={cfg.finetune.batch_size}, "
        f"K={cfg.finetune.grad_steps} of T={cfg.finetune.num_steps}, {cfg.finetune.cluster.mixed_precision})")
    finetuner = Finetuner(cfg, device="cpu")
    resident = finetuner_resident_bytes(finetuner)
    timer = timer_factory(finetuner) if timer_factory else None
    rss = PeakSampler()
    log("running one train_step")
    with rss, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        started = time.perf_counter()
        metrics = finetuner.train_step(0)
        wall = time.perf_counter() - started
    peak_delta = profiler_peak_bytes(prof)
    return {
        "precision": Precision.of(finetuner),
        "wall_s": wall,
        "resident_bytes": resident,
        "profiler_peak_delta_bytes": peak_delta,
        "measured_peak_bytes": resident + peak_delta,
        "rss_peak_bytes": rss.peak,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "finite_loss": math.isfinite(metrics["loss"]),
        "parts_s": timer.parts(wall) if timer else None,
    }


class PartTimer:
    """Where one train_step's time goes, from hooks on the Finetuner's modules (no change to lbgen).

    Forward: pre/post hooks on the UNet (calls with and without a graph), the VAE decoder, CLIP's
    image tower and the IQA network. Backward: the autograd engine runs ready nodes latest-created
    first, so it goes through IQA's branch, then CLIP's (and the losses'), then the VAE, then the
    UNet chain. Gradient hooks mark when each stretch starts: the first gradient at the IQA output,
    at CLIP's output, at the VAE decoder's output, at the VAE's input; the last LoRA gradient ends it.
    """

    def __init__(self, finetuner: Finetuner):
        self.forward: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        self._started: dict[str, float] = {}
        vae = finetuner.pipe.vae
        self._time_forward(finetuner.pipe.unet, finetuner.pipe.unet, "unet")
        self._time_forward(finetuner.clip.model.visual, finetuner.clip.model.visual, "clip")
        self._time_forward(finetuner.quality.metric, finetuner.quality.metric, "iqa")
        self._time_forward(vae.post_quant_conv, vae.decoder, "vae")
        vae.post_quant_conv.register_forward_pre_hook(lambda module, args: self._mark_on_grad(args[0], "vae.in"))
        for p in finetuner.lora_params:
            p.register_post_accumulate_grad_hook(lambda _: self._mark("lora grads", last=True))

    def _time_forward(self, first, last, part: str) -> None:
        """Time from `first`'s forward start to `last`'s forward end; mark `part.out`'s first gradient."""

        def start(module, args):
            self._started[part] = time.perf_counter()

        def stop(module, args, output):
            key = f"{part} fwd" + ((" (graph)" if torch.is_grad_enabled() else " (no grad)") if part == "unet" else "")
            self.forward[key] = self.forward.get(key, 0.0) + time.perf_counter() - self._started[part]
            self._mark_on_grad(output.sample if hasattr(output, "sample") else output, f"{part}.out")

        first.register_forward_pre_hook(start)
        last.register_forward_hook(stop)

    def _mark_on_grad(self, tensor, name: str) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.register_hook(lambda grad: self._mark(name))

    def _mark(self, name: str, last: bool = False) -> None:
        """Record when `name` happens: the first time, or with `last` the latest (a hook must return None)."""
        if last or name not in self.marks:
            self.marks[name] = time.perf_counter()

    def parts(self, wall: float) -> dict[str, float]:
        """Seconds per part; the remainder (prompts, schedulers, losses, optimisers, D step) is 'other'."""
        m = self.marks
        parts = {
            **self.forward,
            "iqa bwd": m["clip.out"] - m["iqa.out"],
            "clip bwd (incl. resize to 224)": m["vae.out"] - m["clip.out"],
            "vae bwd": m["vae.in"] - m["vae.out"],
            "unet bwd (incl. recompute, scheduler chain)": m["lora grads"] - m["vae.in"],
        }
        parts["other"] = wall - sum(parts.values())
        return parts


def run_header(geometry: dict, precision) -> dict:
    """What every JSON document of this script starts with: when, with what, how it was called."""
    return json_header(geometry=geometry, precision=precision.describe())


# ---------------------------------------------------------------- the two modes


def memory_check(args) -> dict:
    """The estimator against a real step at CHECK_GEOMETRY; also yields the Finetuner's precision policy."""
    cfg = finetune_config(CHECK_GEOMETRY, args.precision)
    real = real_step(cfg)
    precision = real["precision"]
    log(f"real step: {real['wall_s']:.1f} s; estimating the same step on fake tensors ({precision.describe()})")
    estimate = estimate_train_step(build_fake_models(cfg, precision), cfg, precision, checkpointing=True)
    return {
        "geometry": CHECK_GEOMETRY,
        "precision": precision,
        "estimate_gib": estimate["peak_bytes"] / GiB,
        "measured_gib": real["measured_peak_bytes"] / GiB,
        "measured_resident_gib": real["resident_bytes"] / GiB,
        "measured_step_delta_gib": real["profiler_peak_delta_bytes"] / GiB,
        "ratio_estimate_over_measured": estimate["peak_bytes"] / real["measured_peak_bytes"],
        "estimate_step_delta_gib": (estimate["peak_bytes"] - estimate["resident_bytes"]) / GiB,
        "ratio_step_delta": (estimate["peak_bytes"] - estimate["resident_bytes"]) / real["profiler_peak_delta_bytes"],
    }


def cost_sheet(args) -> dict:
    check = memory_check(args)
    precision = check.pop("precision")
    geometry = {"resolution": args.resolution, "batch": args.batch, "grad_steps": args.grad_steps, "steps": args.steps}
    cfg = finetune_config(geometry, args.precision, classes="imagenet1k")
    log(f"building fake sd15-shape models at {args.resolution} px")
    models = build_fake_models(cfg, precision)
    log("counting generation FLOPs")
    gen = generation_flops(models, cfg, args.steps)
    steps = {}
    for checkpointing in (True, False):
        log(f"estimating the fine-tuning step, gradient checkpointing {'on' if checkpointing else 'off'}")
        steps[checkpointing] = estimate_train_step(models, cfg, precision, checkpointing)
    paper = paper_run(args.batch)
    log(f"counting {paper['pretrain_model']} train FLOPs")
    pretrain = train_flops_per_image(paper["pretrain_model"], paper["pretrain_image_size"])
    gen_total = sum(gen.values())
    diffusion = gen["text_encoder"] + gen["unet"] + gen["vae_decode"]
    return {
        **run_header(geometry, precision),
        "utilization": args.utilization,
        "generate_tflops_per_image": gen_total / TERA,
        "generate_tflops_parts": {k: v / TERA for k, v in gen.items()},
        "finetune_tflops_per_step": steps[True]["flops"] / TERA,
        "finetune_tflops_per_step_no_checkpointing": steps[False]["flops"] / TERA,
        "finetune_tflops_parts": {k: v / TERA for k, v in steps[True]["flops_parts"].items()},
        "finetune_grad_indices": steps[True]["grad_indices"],
        "finetune_peak_gib": steps[True]["peak_bytes"] / GiB,
        "finetune_peak_gib_no_checkpointing": steps[False]["peak_bytes"] / GiB,
        "finetune_peak_at": steps[True]["peak_at"],
        "finetune_peak_at_no_checkpointing": steps[False]["peak_at"],
        "finetune_peak_breakdown_gib": {k: v / GiB for k, v in steps[True]["peak_breakdown_bytes"].items()},
        "finetune_peak_breakdown_gib_no_checkpointing": {
            k: v / GiB for k, v in steps[False]["peak_breakdown_bytes"].items()},
        "memory_check": check,
        "pretrain_gflops_per_image": {k: v / 1e9 for k, v in pretrain.items()},
        "paper_run": paper,
        "gpu_peak_tflops": {k: v / TERA for k, v in GPU_PEAK_FLOPS.items()},
        "gpu_hours": paper_run_hours(paper, gen, steps[True]["flops"], pretrain["train"], args.utilization),
        # Only comparable at the geometry the public figures were taken at.
        "public_generation": public_generation(paper, diffusion)
        if (args.resolution, args.steps) == tuple(PUBLIC_GEOMETRY.values()) else None,
    }


def measure_step(args) -> dict:
    """One real train_step at MEASURE_GEOMETRY, with the estimator's prediction for it beside."""
    cfg = finetune_config(MEASURE_GEOMETRY, args.precision)
    real = real_step(cfg, timer_factory=PartTimer)
    precision = real.pop("precision")
    log("estimating the same step on fake tensors")
    estimate = estimate_train_step(build_fake_models(cfg, precision), cfg, precision, checkpointing=True)
    parts = real["parts_s"]
    by_model: dict[str, float] = {}
    for part, seconds in parts.items():  # "vae fwd", "vae bwd" -> "vae"
        by_model[part.split()[0]] = by_model.get(part.split()[0], 0.0) + seconds
    return {
        **run_header(MEASURE_GEOMETRY, precision),
        "threads": torch.get_num_threads(),
        "wall_s": real["wall_s"],
        "rss_peak_gib": real["rss_peak_bytes"] / GiB,
        "maxrss_gib": real["maxrss_bytes"] / GiB,
        "profiler_peak_gib": real["profiler_peak_delta_bytes"] / GiB,
        "resident_gib": real["resident_bytes"] / GiB,
        "measured_peak_gib": real["measured_peak_bytes"] / GiB,
        "estimated_peak_gib": estimate["peak_bytes"] / GiB,
        "ratio_estimate_over_measured": estimate["peak_bytes"] / real["measured_peak_bytes"],
        "finite_loss": real["finite_loss"],
        "parts_s": parts,
        "dominant_part": max(parts, key=parts.get),
        "seconds_by_model": by_model,
        "dominant_model": max(by_model, key=by_model.get),
    }


# ---------------------------------------------------------------- output


def print_cost_sheet(r: dict) -> None:
    g = r["geometry"]
    print(f"Cost sheet, sd15-shape, {g['resolution']} px; torch {r['torch']}; {r['precision']}")
    print(f"\nGeneration, per image ({g['steps']} DDPM steps, CFG = 2 UNet passes per step):")
    for part, tflops in r["generate_tflops_parts"].items():
        print(f"  {part:<14} {tflops:10.3f} TFLOPs")
    print(f"  {'total':<14} {r['generate_tflops_per_image']:10.3f} TFLOPs/image")
    print(f"\nFine-tuning step per worker (B={g['batch']}, K={g['grad_steps']} of T={g['steps']}, grad indices "
          f"{r['finetune_grad_indices']}):")
    for part, tflops in r["finetune_tflops_parts"].items():
        print(f"  {part:<45} {tflops:10.2f} TFLOPs")
    print(f"  {'total, checkpointing on / off':<45} {r['finetune_tflops_per_step']:10.2f} / "
          f"{r['finetune_tflops_per_step_no_checkpointing']:.2f} TFLOPs")
    print(f"  peak memory, checkpointing on / off: {r['finetune_peak_gib']:.2f} / "
          f"{r['finetune_peak_gib_no_checkpointing']:.2f} GiB")
    for label, suffix in (("on", ""), ("off", "_no_checkpointing")):
        breakdown = r["finetune_peak_breakdown_gib" + suffix]
        print(f"    checkpointing {label}: reached in {r['finetune_peak_at' + suffix]}; (GiB) "
              + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items() if v >= 0.005))
    c = r["memory_check"]
    print(f"\nMemory check, real Finetuner.train_step on this CPU at {c['geometry']}:")
    print(f"  measured {c['measured_gib']:.3f} GiB (resident {c['measured_resident_gib']:.3f} + step peak "
          f"{c['measured_step_delta_gib']:.3f}), estimated {c['estimate_gib']:.3f} GiB: "
          f"ratio {c['ratio_estimate_over_measured']:.3f}")
    print(f"  the step's own peak above what is resident: measured {c['measured_step_delta_gib']:.3f} GiB, estimated "
          f"{c['estimate_step_delta_gib']:.3f} GiB: ratio {c['ratio_step_delta']:.3f}")
    p = r["pretrain_gflops_per_image"]
    print(f"\nPre-training {r['paper_run']['pretrain_model']}: {p['forward']:.2f} GFLOPs forward, "
          f"{p['train']:.2f} GFLOPs "
          f"forward+backward per image (x{p['train'] / p['forward']:.2f})")
    run = r["paper_run"]
    print(f"\nGPU-hours of the paper's run ({run['finetune_steps']} steps x {run['finetune_workers']} GPUs after "
          f"{run['d_warmup_steps']} D warm-up steps, {run['images']:,} images, {run['pretrain_epochs']} epochs x "
          f"{run['pretrain_images']:,}) at {r['utilization']:.0%} of the bf16 dense peak:")
    print(f"  {'GPU':<6} {'finetune':>9} {'D warm-up':>9} {'generate':>9} {'pretrain':>9} {'total':>9}")
    for gpu, h in r["gpu_hours"].items():
        print(f"  {gpu:<6} {h['finetune']:9.2f} {h['finetune_d_warmup']:9.2f} {h['generate']:9.1f} "
              f"{h['pretrain']:9.1f} "
              f"{h['total']:9.1f}")
    print("\nPublic SD 1.5 speeds (512 px, 50 steps, fp16) for the same images:")
    if r["public_generation"] is None:
        print(f"  not compared: this sheet is for {g['resolution']} px, {g['steps']} steps")
        return
    for gpu, pub in r["public_generation"].items():
        print(f"  {gpu}: {pub['images_per_s']} images/s ({pub['setting']}): {pub['generate_gpu_hours']:.1f} GPU-hours; "
              f"implies {pub['implied_utilization']:.0%} utilisation")


def print_measured_step(r: dict) -> None:
    g = r["geometry"]
    print(f"One real Finetuner.train_step on CPU ({r['threads']} threads): sd15-shape, {g['resolution']} px, "
          f"batch {g['batch']}, "
          f"K={g['grad_steps']} of T={g['steps']}, gradient checkpointing, LoRA r128; {r['precision']}")
    print(f"  wall {r['wall_s']:.1f} s; peak RSS {r['rss_peak_gib']:.2f} GiB (sampled), "
          f"maxrss {r['maxrss_gib']:.2f} GiB")
    print(f"  profiler: peak allocations during the step {r['profiler_peak_gib']:.2f} GiB over "
          f"{r['resident_gib']:.2f} GiB "
          f"resident = {r['measured_peak_gib']:.2f} GiB; estimator {r['estimated_peak_gib']:.2f} GiB "
          f"(ratio {r['ratio_estimate_over_measured']:.3f}); finite loss: {r['finite_loss']}")
    for part, seconds in sorted(r["parts_s"].items(), key=lambda kv: -kv[1]):
        print(f"  {part:<44} {seconds:8.1f} s  {seconds / r['wall_s']:6.1%}")
    print("  by model: " + ", ".join(f"{model} {seconds / r['wall_s']:.0%}" for model, seconds in
                                     sorted(r["seconds_by_model"].items(), key=lambda kv: -kv[1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=50, help="DDPM steps T, for generation and fine-tuning")
    parser.add_argument("--batch", type=int, default=4, help="classes per fine-tuning worker per step (B)")
    parser.add_argument("--grad-steps", type=int, help="fine-tuning steps that record a graph (K); default: 5 "
                        "(the paper's), or --steps if fewer")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"], help="finetune.cluster.mixed_precision")
    parser.add_argument("--utilization", type=float, default=0.35,
                        help="model-FLOPs utilisation assumed for GPU-hours: the public A100 SD 1.5 figure implies "
                             "~0.4 for generation at batch 16; LoRA training with recomputation and small batches "
                             "typically reaches 0.3-0.4")
    parser.add_argument("--measure-step", action="store_true",
                        help="instead: run one real train_step at 512 px, K=2 of T=4, batch 1 on this CPU (long)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    args.grad_steps = args.grad_steps or min(5, args.steps)

    result = measure_step(args) if args.measure_step else cost_sheet(args)
    (print_measured_step if args.measure_step else print_cost_sheet)(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
