"""GPU check of the real workload (preset `sd15-shape`), in one process, as ONE JSON document on stdout.

Measures, on one GPU, within `--budget-s` seconds (progress on stderr):

- generation at 512 px, fp16, 50 DDPM steps, CFG 2.0, each arm after a warm-up call:
  - bare diffusers (`StableDiffusionPipeline.__call__`: fp16, SDPA, the same pipeline object, steps, guidance
    and scheduler) at batch 1, 8 and 16;
  - lbgen eager (`GenerateBatch`, `--no-fast`, micro_batch 8);
  - lbgen fast (`lbgen benchmark` with `generate.fast`, micro_batch 8), then fast with
    `--compile reduce-overhead` (CUDA graphs) while the budget lasts;
  - each as images/s and as a percentage of the GPU's dense fp16 peak (`lbgen.stages.benchmark.PEAK_TFLOPS`),
    from the FLOPs per image counted on the model (`flops_per_image`: every step's CFG UNet calls and the VAE
    decode, the cost sheet's 83 TFLOPs at this geometry), and `targets`: fast over bare eager diffusers at the
    same batch (target 1.3), fast images/s (target 2.1), fast % of peak (goal 40);
- pre-training's GPU decode (`pretrain.decode_device: cuda`): `DeviceDecoder` images/s on a batch of 512 px
  q95 JPEGs cropped to 224 px, and its crops' mean absolute difference from the CPU stage's;
- one fine-tuning step (`Finetuner.train_step`: B=4, K=5 of T=50, 512 px, LoRA r128, gradient
  checkpointing) in bf16 and in fp16: peak GPU memory (`torch.cuda.max_memory_allocated`, reset
  between), step time after a warm-up step when the budget allows, and whether the losses are finite.

What to expect: `benchmarks/real_workload.py` estimates the bf16 step's peak at 15.5 GiB with
checkpointing (models included; allocator fragmentation not), and 83 TFLOPs per generated image,
i.e. ~3.3 images/s on an H200 at 35% of the ~790 TFLOP/s bf16 matrix rate measured on one.

lbgen and the model libraries are imported only once a GPU is found. Each part that fails (out of
memory, say) records its error in the document and the exit code is 1; the others still run.
`elapsed_s` is the whole run. Run it through `benchmarks/gpu_check.sh`, which fails at once without
a GPU and picks the interpreter. `--smoke` runs the same code on a CPU at a toy size (preset `tiny`,
64 px, 4 steps, bare batches 1 and 2, no compiled arm) to prove the path end to end apart from the CUDA calls.

The GPU path has NOT run yet: no GPU was lent to the sessions that wrote it (only `--smoke` ran).

    benchmarks/gpu_check.sh > gpu_check.json          # on the GPU machine, < 8 minutes
    benchmarks/gpu_check.sh --smoke > smoke.json      # on a CPU, 2-3 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import math
import sys
import time
from functools import partial

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # before diffusers/peft imports (ENVIRONMENT.md)

import numpy as np
import torch

GiB = 2**30
STARTED = time.perf_counter()
# What each mode runs: the paper's geometry on the GPU, a toy one for the CPU smoke run.
SETTINGS = {
    "gpu": {"preset": "sd15-shape", "resolution": 512, "gen_steps": 50, "gen_batch": 8, "bare_batches": (1, 8, 16),
            "compile": "reduce-overhead", "decode_batch": 256, "ft": {"batch_size": 4, "grad_steps": 5, "num_steps": 50}},
    "smoke": {"preset": "tiny", "resolution": 64, "gen_steps": 4, "gen_batch": 2, "bare_batches": (1, 2),
              "compile": None, "decode_batch": 16, "ft": {"batch_size": 2, "grad_steps": 2, "num_steps": 4}},
}
GUIDANCE = 2.0
TIMED_CALLS = 2  # timed generation calls per arm, after the warm-up, while the budget lasts


def log(message: str) -> None:
    print(f"[{elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)


def elapsed() -> float:
    return time.perf_counter() - STARTED


class Budget:
    """The run's deadline; optional repetitions run only when their last duration still fits."""

    def __init__(self, seconds: float):
        self.deadline = STARTED + seconds

    def allows(self, seconds: float) -> bool:
        return time.perf_counter() + seconds < self.deadline


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[object, float]:
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - started


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- generation


def throughput(call, images_per_call: int, device: torch.device, budget: Budget) -> dict:
    """images/s of `call` over up to TIMED_CALLS calls after one warm-up call (compilation, allocator, cuDNN)."""
    _, warmup = timed(call, device)
    seconds = []
    while len(seconds) < TIMED_CALLS and budget.allows(max([warmup, *seconds])):
        seconds.append(timed(call, device)[1])
    if not seconds:  # the budget allowed none: the warm-up call is all there is
        return {"images_per_s": images_per_call / warmup, "timed_calls": 0, "warmup_s": warmup,
                "note": "warm-up call only"}
    return {"images_per_s": images_per_call * len(seconds) / sum(seconds), "timed_calls": len(seconds),
            "warmup_s": warmup}


def generation_config(settings: dict, batch: int, **generate):
    """The generation parts' config: `settings`' geometry, fp16, DDPM, CFG 2.0, micro-batch `batch`."""
    from lbgen.config import resolve

    return resolve(settings["preset"], overrides={
        "classes": "imagenet1k",
        "model": {"resolution": settings["resolution"]},
        "generate": {"steps": settings["gen_steps"], "batch_size": batch, "micro_batch": batch, "dtype": "fp16",
                     "scheduler": "ddpm", "guidance": GUIDANCE, "images_per_class": 1300,
                     "threads": torch.get_num_threads(), **generate},
        "benchmark": {"batches": TIMED_CALLS, "find_max_micro_batch": False},
    })


def share_of_peak(arm: dict, flops_per_image: float, peak: float | None) -> dict:
    """`arm` with its percentage of the device's peak, from the FLOPs per image counted on the model."""
    return {**arm, "percent_of_peak": round(100 * arm["images_per_s"] * flops_per_image / 1e12 / peak, 2) if peak else None}


def check_generation(settings: dict, device: torch.device, budget: Budget) -> dict:
    """lbgen's eager path (`--no-fast`) and bare diffusers on the same pipeline object, at the batches of
    `settings["bare_batches"]`; FLOPs per image counted on the model, each arm as a share of the device's peak."""
    from lbgen.data.classes import load_class_table
    from lbgen.stages.benchmark import flops_per_image, peak_tflops
    from lbgen.stages.generate import GenerateBatch

    batch = settings["gen_batch"]
    cfg = generation_config(settings, batch, fast=False)
    names = load_class_table(cfg.classes).names

    def prompts(size: int) -> list[str]:
        return [names[i % len(names)] for i in range(size)]

    log(f"generation: building GenerateBatch ({settings['preset']}, {settings['resolution']} px, fp16, eager)")
    generate_batch, build_s = timed(lambda: GenerateBatch(dataclasses.asdict(cfg), str(device)), device)
    rows = {"seed": np.arange(batch), "prompt": np.array(prompts(batch))}
    flops = flops_per_image(generate_batch, rows)
    peak = peak_tflops(cfg, device)
    log(f"generation: lbgen eager GenerateBatch, batch {batch}, {settings['gen_steps']} steps "
        f"({flops / 1e12:.3g} TFLOPs/image)")
    lbgen = share_of_peak(throughput(lambda: generate_batch(rows), batch, device, budget), flops, peak)
    pipe = generate_batch.pipe  # the same modules and weights, in the same dtype, as diffusers builds them
    generator = torch.Generator(device).manual_seed(0)

    def bare_call(size: int):
        return pipe(prompt=prompts(size), num_inference_steps=settings["gen_steps"], guidance_scale=GUIDANCE,
                    height=settings["resolution"], width=settings["resolution"], output_type="np",
                    generator=generator).images

    bare = {}
    for size in settings["bare_batches"]:
        log(f"generation: bare diffusers StableDiffusionPipeline.__call__ ({type(pipe.scheduler).__name__}), batch {size}")
        bare[str(size)] = share_of_peak(throughput(partial(bare_call, size), size, device, budget), flops, peak)
    return {
        "resolution": settings["resolution"], "steps": settings["gen_steps"], "batch": batch, "dtype": "fp16",
        "guidance": GUIDANCE, "flops_per_image": flops, "peak_tflops": peak, "build_s": build_s,
        "lbgen_eager": lbgen, "diffusers": bare, "peak_gib": peak_gib(device),
    }


def check_fast(settings: dict, compile_mode: str = "none") -> dict:
    """`lbgen benchmark` with the fast paths (`generate.fast`) and `compile_mode`, on the generation part's
    settings: steady images/s, FLOPs per image counted on the model, % of the device's peak. The largest
    micro-batch search is left out (it would run up to 256 images at once; `lbgen benchmark` does it by default)."""
    from lbgen.stages.benchmark import benchmark

    cfg = generation_config(settings, settings["gen_batch"], fast=True, compile=compile_mode)
    log(f"benchmark: lbgen benchmark --fast --compile {compile_mode}, batch {settings['gen_batch']}")
    return benchmark(cfg)


def targets(results: dict, batch: int) -> dict:
    """Issue 26's targets, from the generation arms that ran: the best fast arm against bare eager diffusers at
    the same batch (target 1.3), its images/s (target 2.1 on an H100/H200) and % of peak (goal 40)."""
    fast = [results[k] for k in ("fast", "fast_compiled") if "images_per_s" in results.get(k, {})]
    bare = results.get("generate", {}).get("diffusers", {}).get(str(batch))
    if not fast:
        return {"note": "no fast arm ran"}
    best = max(fast, key=lambda arm: arm["images_per_s"])
    return {
        "fast_images_per_s": best["images_per_s"], "fast_percent_of_peak": best["percent_of_peak"],
        "fast_over_bare_diffusers_same_batch": round(best["images_per_s"] / bare["images_per_s"], 3) if bare else None,
        "target_ratio": 1.3, "target_images_per_s": 2.1, "goal_percent_of_peak": 40,
    }


# ---------------------------------------------------------------- fine-tuning


def check_finetune_step(settings: dict, precision: str, device: torch.device, budget: Budget) -> dict:
    """One warm-up `train_step` and, when the budget allows, one timed one; peak memory over both."""
    from lbgen.config import resolve
    from lbgen.stages.finetune import Finetuner

    ft = {**settings["ft"], "cluster": {"mixed_precision": precision}, "gradient_checkpointing": True,
          "lora_rank": 128, "lora_alpha": 128, "d_warmup_passes": 0}
    cfg = resolve(settings["preset"], overrides={"model": {"resolution": settings["resolution"]}, "finetune": ft})
    log(f"fine-tuning {precision}: building Finetuner "
        f"(B={ft['batch_size']}, K={ft['grad_steps']} of T={ft['num_steps']})")
    finetuner, build_s = timed(lambda: Finetuner(cfg, device=device), device)
    resident = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
    free_memory(device)  # peak from here on: the step's, over the models already resident
    log(f"fine-tuning {precision}: warm-up step")
    warmup, warmup_s = timed(lambda: finetuner.train_step(0), device)
    result = {"build_s": build_s, "resident_gib": resident, "warmup_step_s": warmup_s,
              "warmup_loss": warmup["loss"], "warmup_grad_norm": warmup["grad_norm"]}
    steps = [warmup]
    if budget.allows(warmup_s):
        log(f"fine-tuning {precision}: timed step")
        timed_step, result["step_s"] = timed(lambda: finetuner.train_step(1), device)
        result.update(loss=timed_step["loss"], grad_norm=timed_step["grad_norm"])
        steps.append(timed_step)
    else:
        result["note"] = "budget allowed the warm-up step only"
    result["peak_gib"] = peak_gib(device)
    losses = ("loss", "loss_en", "loss_in", "loss_q", "loss_d")
    result["finite_losses"] = all(math.isfinite(s[k]) for s in steps for k in losses)
    result["finite_grad_norms"] = all(math.isfinite(s["grad_norm"]) for s in steps)
    return result


# ---------------------------------------------------------------- main


# ---------------------------------------------------------------- pre-training's decode on the GPU


def check_gpu_decode(settings: dict, device: torch.device, budget: Budget) -> dict:
    """`pretrain.decode_device: cuda`: images/s of `DeviceDecoder` (nvJPEG + crop) on batches of 512 px q95 JPEGs
    cropped to 224 px by the train recipe, and its crops' mean absolute difference from the CPU stage's."""
    from loader_per_cpu import ALL_ROWS, jpeg_rows

    from lbgen.data.transforms import DeviceDecoder, ImageTransform, decode_batch, plan_batch

    rows, spec = jpeg_rows(settings["decode_batch"], 512, 95, grain=6.0), ImageTransform(224, True)
    planned = plan_batch(rows, spec, ALL_ROWS, "train", seed=0)
    decoder = DeviceDecoder(224, device)
    result = throughput(lambda: decoder(planned), rows.num_rows, device, budget)
    on_cpu = decode_batch(rows, spec, ALL_ROWS, "train", seed=0)["image"]
    on_device = decoder(planned)["image"].cpu().numpy()
    return {**result, "batch": rows.num_rows, "mean_abs_diff_from_cpu": float(np.abs(on_device.astype(int) - on_cpu.astype(int)).mean())}


def run_part(results: dict, name: str, fn, device: torch.device) -> float:
    """Run one part; an error (out of memory, say) is recorded in the document instead of ending the run.

    The part's models are freed before the next one. Returns the part's duration in seconds.
    """
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # noqa: BLE001  any failure of a part is a result to report, not a crash
        log(f"{name} failed: {err!r}")
        results[name] = {"error": f"{type(err).__name__}: {err}"}
    free_memory(device)
    return time.perf_counter() - started


def finite_json(value):
    """`value` with NaN and infinities as strings ("nan", "inf"): plain JSON has no such numbers.

    An fp16 step's gradient norm is infinite or NaN while GradScaler searches its scale (it then
    skips that step); the document keeps it visible rather than invalid.
    """
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy size on the CPU (preset tiny, 64 px, 4 steps)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for the whole run; optional repetitions stop early to keep within it "
                             "(gpu_check.sh kills the run at 470 s)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); --smoke runs the CPU toy version",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    settings = SETTINGS["smoke" if args.smoke else "gpu"]
    budget = Budget(args.budget_s)
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "preset": settings["preset"],
    }
    generate_s = run_part(results, "generate", partial(check_generation, settings, device, budget), device)
    if budget.allows(generate_s / 2):  # lbgen's arm of the generation part, again
        run_part(results, "fast", partial(check_fast, settings), device)
    else:
        results["fast"] = {"error": f"skipped: the budget ({args.budget_s:.0f} s) would be exceeded"}
    if settings["compile"] and budget.allows(generate_s):  # compiling takes a minute or two on a GPU
        run_part(results, "fast_compiled", partial(check_fast, settings, settings["compile"]), device)
    results["targets"] = targets(results, settings["gen_batch"])
    run_part(results, "pretrain_decode", partial(check_gpu_decode, settings, device, budget), device)
    finetune = results["finetune"] = {"resolution": settings["resolution"], **settings["ft"], "lora_rank": 128,
                                      "gradient_checkpointing": True}
    bf16_s = run_part(finetune, "bf16", partial(check_finetune_step, settings, "bf16", device, budget), device)
    if budget.allows(bf16_s):  # fp16 costs what bf16 did; past the budget the document would never be printed
        run_part(finetune, "fp16", partial(check_finetune_step, settings, "fp16", device, budget), device)
    else:
        results["finetune"]["fp16"] = {"error": f"skipped: the budget ({args.budget_s:.0f} s) would be exceeded"}
    results["elapsed_s"] = elapsed()
    print(json.dumps(finite_json(results), indent=2, allow_nan=False))
    parts = (results["generate"], results["fast"], results.get("fast_compiled", {}), results["pretrain_decode"], results["finetune"]["bf16"], results["finetune"]["fp16"])
    return 1 if any("error" in part for part in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
