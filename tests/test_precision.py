"""Every precision setting runs on CPU as it would on a GPU: fine-tuning and its resume, pre-training, generation."""

import dataclasses

import numpy as np
import pytest
import torch

from lbgen.data.classes import load_class_table
from lbgen.data.plan import plan
from lbgen.runtime.precision import MixedPrecision, weight_dtype
from lbgen.stages.finetune import Finetuner
from lbgen.stages.generate import GenerateBatch
from lbgen.stages.pretrain import Pretrainer

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def test_records_say_how_numbers_were_made():
    assert MixedPrecision("bf16", "cpu").record() == {"device": "cpu", "precision": "bf16"}
    assert MixedPrecision("no", "cpu").record() == {"device": "cpu", "precision": "fp32"}
    assert MixedPrecision("fp16", "cpu").grad_scaler().is_enabled()
    assert not MixedPrecision("bf16", "cpu").grad_scaler().is_enabled()


def _lora(ft: Finetuner) -> dict:
    return {k: v.clone() for k, v in ft.lora_state_dict().items()}


# The smallest step that keeps every part: CFG sampling, a gradient step, the losses, the loss scaler. A CPU
# runs bf16 and fp16 matmuls fast only with the matching instructions (avx512_bf16 or AMX for bf16,
# avx512_fp16 or AMX-FP16 for fp16); without them torch falls back to kernels ~30x slower than fp32's.
SMALL_STEP = dict(batch_size=2, num_steps=2, grad_steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRECISIONS)
def test_finetune_step_and_resume(tiny_cfg, tmp_path, name):
    cfg = tiny_cfg(model=dict(resolution=32),
                   finetune=dict(cluster=dict(mixed_precision=name), lr=0.05, d_warmup_passes=0, **SMALL_STEP))
    ft = Finetuner(cfg)
    assert ft.pipe.unet.dtype == PRECISIONS[name]  # frozen weights in the autocast dtype
    assert all(p.dtype == torch.float32 for p in ft.lora_params)  # the LoRA trains in fp32
    before = _lora(ft)
    # fp16's loss scaler starts high: an overflowing first step is skipped and the scale backs off.
    for step in range(3):
        metrics = ft.train_step(step)
        assert all(np.isfinite(metrics[k]) for k in ("loss", "loss_en", "loss_in", "loss_q", "loss_d"))
        grads = [p.grad for p in ft.lora_params if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            break
    assert name == "fp16" or step == 0
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    after = _lora(ft)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the optimiser stepped"

    ft.save(tmp_path, step=step + 1)
    resumed = Finetuner(cfg)
    assert resumed.load(tmp_path) == step + 1
    assert resumed.scaler.state_dict() == ft.scaler.state_dict()
    straight, again = ft.train_step(step + 1), resumed.train_step(step + 1)
    assert straight["loss"] == again["loss"]  # the resumed run continues as the uninterrupted one
    assert all(torch.equal(a, b) for a, b in zip(_lora(ft).values(), _lora(resumed).values()))


@pytest.mark.parametrize("name", PRECISIONS)
def test_pretrain_epoch(tiny_cfg, name):
    cfg = tiny_cfg(pretrain=dict(cluster=dict(mixed_precision=name), batch_size=8))
    trainer = Pretrainer(cfg, num_classes=4, steps_per_epoch=3)
    gen = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=gen),
                "label": torch.randint(0, 4, (8,), generator=gen)} for _ in range(3)]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    record = trainer.train_epoch(batches)
    assert record["images"] == 24 and np.isfinite(record["train_loss"])
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert np.isfinite(trainer.evaluate(batches)["val_loss"])


@pytest.mark.parametrize("name", PRECISIONS)
def test_generation(tiny_cfg, name):
    cfg = tiny_cfg(generate=dict(dtype=name))
    gen = GenerateBatch(dataclasses.asdict(cfg))
    assert gen.pipe.unet.dtype == weight_dtype(name) == PRECISIONS[name]
    rows = plan(load_class_table(cfg.classes), cfg)[:4]
    pixels = gen({k: np.array([r[k] for r in rows]) for k in rows[0]})["pixels"]
    assert pixels.shape == (4, 64, 64, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 1 and not np.array_equal(pixels[0], pixels[1])
