"""GPU-hours of the paper's ImageNet-1K run from counted FLOPs: per stage, per GPU type, at one utilisation,
beside the public SD 1.5 generation speeds and the utilisation those imply."""

from __future__ import annotations

import math

from lbgen.config import resolve
from lbgen.data.classes import load_class_table
from lbgen.stages.finetune import total_steps

# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts; fp16 is the same).
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12}
# Public SD 1.5 speeds at 512 px, 50 steps, fp16 (diffusers docs and benchmark READMEs; ENVIRONMENT.md).
PUBLIC_GEOMETRY = {"resolution": 512, "steps": 50}
PUBLIC_GENERATION = {
    "A100": (1.5, "batch 16, SDPA + torch.compile + channels_last"),
    "H100": (2.1, "batch 1, stable-fast"),
}
# The small geometry at which the estimate is checked against a real step on this CPU.

def gpu_hours(flops: float, peak: float, utilization: float) -> float:
    return flops / (peak * utilization) / 3600


def paper_run_hours(paper, gen: dict[str, float], step_flops: float, pretrain_flops: float, utilization: float) -> dict:
    """GPU-hours per stage of the paper's ImageNet-1K run, per GPU type, at one model-FLOPs utilisation.

    `gen`: generation FLOPs per image by part. The discriminator's warm-up before the first step
    samples `finetune_batch` images per D step with the frozen generator and embeds them with CLIP.
    """
    warmup_images = paper["d_warmup_steps"] * paper["finetune_workers"] * paper["finetune_batch"]
    warmup_flops = warmup_images * (gen["text_encoder"] + gen["unet"] + gen["vae_decode"] + gen["clip_score"])
    hours = {}
    for gpu, peak in GPU_PEAK_FLOPS.items():
        stages = {
            "finetune": gpu_hours(paper["finetune_steps"] * paper["finetune_workers"] * step_flops, peak, utilization),
            "finetune_d_warmup": gpu_hours(warmup_flops, peak, utilization),
            "generate": gpu_hours(paper["images"] * sum(gen.values()), peak, utilization),
            "pretrain": gpu_hours(paper["pretrain_epochs"] * paper["pretrain_images"] * pretrain_flops, peak,
                                  utilization),
        }
        hours[gpu] = {**stages, "total": sum(stages.values())}
    return hours


def paper_run(batch: int) -> dict:
    """The paper's ImageNet-1K run as preset `sd15-in1k` sets it, at `batch` classes per worker and step."""
    cfg = resolve("sd15-in1k", overrides={"finetune": {"batch_size": batch}})
    ft = cfg.finetune
    classes = len(load_class_table(cfg.classes))
    images = classes * cfg.generate.images_per_class
    return {
        "finetune_steps": total_steps(cfg, classes),
        "finetune_workers": ft.cluster.workers,
        "finetune_batch": ft.batch_size,
        "d_warmup_steps": ft.d_warmup_passes * math.ceil(classes / (ft.batch_size * ft.cluster.workers)),
        "images": images,
        "pretrain_images": round(images * (1 - cfg.pretrain.val_fraction)),
        "pretrain_epochs": cfg.pretrain.epochs,
        "pretrain_model": cfg.pretrain.model,
        "pretrain_image_size": cfg.pretrain.image_size,
    }


def public_generation(paper: dict, diffusion_flops: float) -> dict:
    """Public SD 1.5 speeds: the GPU-hours they give for the paper's images and the utilisation they imply."""
    return {
        gpu: {
            "images_per_s": rate, "setting": setting,
            "generate_gpu_hours": paper["images"] / rate / 3600,
            "implied_utilization": rate * diffusion_flops / GPU_PEAK_FLOPS[gpu],
        }
        for gpu, (rate, setting) in PUBLIC_GENERATION.items()
    }
