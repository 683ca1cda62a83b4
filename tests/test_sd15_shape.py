"""The real architectures at a real size, on CPU: SD 1.5's UNet/VAE/text encoder and CLIP ViT-L/14 (random
weights, `sd15-shape`) through one bf16 fine-tuning step, its checkpoint and resume, and a generation.

Small settings keep it to minutes: 128 px, T = 2, K = 1, batch 1 (the 512 px step is measured by
benchmarks/real_workload.py --measure-step; benchmarks/RESULTS.md has both).

bf16 where the CPU runs it natively (oneDNN's bf16: AVX-512 or AMX). On a CPU without it torch falls back to
kernels ~30x slower than fp32's (benchmarks/RESULTS.md), and one step of these models would take longer than
the suite allows: there the same step runs in fp32. bf16 itself is tested on every host by
tests/test_precision.py, at the tiny shapes.
"""

import dataclasses
import gc

import numpy as np
import pytest
import torch

from lbgen.config import resolve
from lbgen.data.classes import load_class_table
from lbgen.data.plan import plan
from lbgen.stages.finetune import Finetuner
from lbgen.stages.generate import GenerateBatch

pytestmark = pytest.mark.slow

NATIVE_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
# (mixed precision, generation dtype, the torch dtype both give the frozen weights)
PRECISION = ("bf16", "bf16", torch.bfloat16) if NATIVE_BF16 else ("no", "fp32", torch.float32)

SETTINGS = {
    "model": {"resolution": 128},
    "finetune": {"num_steps": 2, "grad_steps": 1, "batch_size": 1, "cluster": {"mixed_precision": PRECISION[0]}, "d_warmup_passes": 0},
    "generate": {"images_per_class": 1, "steps": 2, "micro_batch": 2, "batch_size": 2, "dtype": PRECISION[1], "threads": 2},
}


@pytest.fixture(scope="module")
def cfg():
    torch.set_num_threads(2)
    return resolve("sd15-shape", overrides=SETTINGS)


def test_one_finetune_step_checkpoints_and_resumes(cfg, tmp_path):
    ft = Finetuner(cfg)
    assert sum(p.numel() for p in ft.pipe.unet.parameters()) > 850e6  # SD 1.5's UNet, LoRA r128 included
    assert ft.pipe.unet.dtype == PRECISION[2] and ft.precision.record()["precision"] == {"no": "fp32"}.get(PRECISION[0], PRECISION[0])
    metrics = ft.train_step(0)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    grads = [p.grad for p in ft.lora_params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    ft.save(tmp_path, step=1)
    saved_lora = ft.lora_state_dict()
    saved_moments = [s["exp_avg"].clone() for s in ft.g_opt.state.values()]
    del ft, grads
    gc.collect()

    resumed = Finetuner(cfg)
    assert resumed.load(tmp_path) == 1
    restored = resumed.lora_state_dict()
    assert restored.keys() == saved_lora.keys() and all(torch.equal(restored[k], saved_lora[k]) for k in saved_lora)
    moments = [s["exp_avg"] for s in resumed.g_opt.state.values()]
    assert len(moments) == len(saved_moments) and all(torch.equal(a, b) for a, b in zip(moments, saved_moments))


def test_generates_two_images(cfg):
    gen = GenerateBatch(dataclasses.asdict(cfg))
    rows = plan(load_class_table(cfg.classes), cfg)[:2]
    pixels = gen({k: np.array([r[k] for r in rows]) for k in rows[0]})["pixels"]
    assert pixels.shape == (2, 128, 128, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 1 and not np.array_equal(pixels[0], pixels[1])
