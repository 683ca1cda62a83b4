"""Fine-tuning: gradients, optimisation effects (plain PyTorch), DDP, resume and CLI (real local Ray)."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lbgen.cli import main
from lbgen.config import ConfigError, resolve
from lbgen.runtime.seeds import seeded_generator
from lbgen.stages.finetune import DISC_FILE, LORA_FILE, Finetuner, class_batch, export_lora, finetune, total_steps

torch.set_num_threads(2)

# Denoising steps per image in the optimisation tests: what they show does not depend on the chain's
# length, and sampling is most of their compute.
FEW_STEPS = 4


def _backward_one_loss(ft: Finetuner, weights: dict) -> None:
    ft.loss_fn.w_en, ft.loss_fn.w_in, ft.loss_fn.lambda_q = weights["w_en"], weights["w_in"], weights["lambda_q"]
    labels = torch.tensor([0, 5])
    gen = seeded_generator(0, "grad")
    cond, uncond = ft._prompt_states(labels)
    images = ft.sampler(ft._latents(2, gen), cond, uncond, [1, 6], gen)
    ft.loss_fn(images, labels, ft.disc)["loss"].backward()


@pytest.mark.parametrize("which", ["w_en", "w_in", "lambda_q"])
def test_each_loss_alone_reaches_lora_and_nothing_frozen(tiny_cfg, which):
    ft = Finetuner(tiny_cfg())
    _backward_one_loss(ft, {"w_en": 0.0, "w_in": 0.0, "lambda_q": 0.0, which: 1.0})
    lora_grads = [p.grad for p in ft.lora_params]
    assert any(g is not None and g.abs().sum() > 0 for g in lora_grads)
    frozen = [
        (name, p) for module in (ft.pipe.unet, ft.pipe.vae, ft.pipe.text_encoder, ft.clip, ft.quality)
        for name, p in module.named_parameters() if not p.requires_grad
    ]
    assert frozen and all(p.grad is None for _, p in frozen)


def _mean_eval(ft: Finetuner):
    """Mean CLIP cosine with own prompt and mean IQA over one image per class, fixed held-out seed."""
    labels = torch.arange(len(ft.table))
    images = ft.generate(labels, seeded_generator(123, "eval"))
    with torch.no_grad():
        cos = (ft.clip.encode_image(images) * ft.loss_fn.text_features[labels]).sum(-1).mean().item()
        return cos, ft.quality(images).mean().item()


@pytest.mark.slow
def test_alignment_only_run_raises_clip_cosine_on_held_out_seeds(tiny_cfg):
    ft = Finetuner(tiny_cfg(finetune=dict(w_en=0.0, w_in=1.0, lambda_q=0.0, lr=0.1, grad_clip=1e6, num_steps=FEW_STEPS)))
    before, _ = _mean_eval(ft)
    for step in range(8):
        ft.train_step(step)
    after, _ = _mean_eval(ft)
    print(f"L_in-only: mean CLIP cosine {before:.4f} -> {after:.4f}")
    assert after > before + 0.005


def test_quality_only_run_raises_iqa_score(tiny_cfg):
    ft = Finetuner(tiny_cfg(finetune=dict(w_en=0.0, w_in=0.0, lambda_q=1.0, lr=0.03, grad_clip=1e6, num_steps=FEW_STEPS)))
    # The same batch and seeds every step: a pure optimisation of L_q on those images.
    scores = [ft.train_step(0)["iqa_score"] for _ in range(6)]
    print("L_q-only: IQA score per step", [round(s, 4) for s in scores])
    assert scores[-1] > scores[0] + 0.005
    assert sum(b > a for a, b in zip(scores, scores[1:])) >= 4


@pytest.mark.slow
def test_discriminator_warmup_beats_chance(tiny_cfg):
    ft = Finetuner(tiny_cfg(finetune=dict(d_warmup_passes=4, d_lr=1e-2, num_steps=FEW_STEPS)))

    def held_out_accuracy():
        labels = torch.arange(len(ft.table))
        gen = seeded_generator(7, "d-eval")
        fake = ft.clip.encode_image(ft.generate(labels, gen))
        real = ft.real_features[torch.randint(len(ft.table), (len(labels),), generator=gen)]
        with torch.no_grad():
            return 0.5 * ((ft.disc(real) > 0).float().mean() + (ft.disc(fake) < 0).float().mean()).item()

    before = held_out_accuracy()
    ft.warmup_discriminator()
    after = held_out_accuracy()
    print(f"D warm-up: held-out accuracy {before:.2f} -> {after:.2f}")
    assert after >= 0.75 and after > before


def test_class_batches_walk_the_table_in_epochs():
    seen = torch.cat([class_batch(s, r, 2, 3, 10, seed=0) for s in range(5) for r in range(2)])
    # 5 steps x 2 ranks x 3 = 30 draws = 3 epochs of a 10-class table: each class exactly 3 times.
    assert torch.bincount(seen, minlength=10).tolist() == [3] * 10
    assert torch.equal(class_batch(4, 1, 2, 3, 10, 0), class_batch(4, 1, 2, 3, 10, 0))


def test_total_steps_from_epochs(tiny_cfg):
    cfg = tiny_cfg(finetune=dict(max_steps=None, epochs=3.0, batch_size=4, cluster=dict(workers=2)))
    assert total_steps(cfg, 1000) == 375


def test_trained_lora_loads_into_a_saved_pipeline_and_changes_it(tiny_cfg, tmp_path):
    from diffusers import DDPMScheduler

    from lbgen.models import create_generator

    ft = Finetuner(tiny_cfg(finetune=dict(lr=0.1)))
    for step in range(2):
        ft.train_step(step)
    ft.save(tmp_path, step=2)
    export_lora(tmp_path / "adapter.safetensors", tmp_path, ft.cfg.finetune)

    create_generator("tiny", resolution=64).save_pretrained(tmp_path / "sd")
    pipe = create_generator(str(tmp_path / "sd"))
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def sample():
        return pipe(["tench"], num_inference_steps=4, guidance_scale=2.0, height=64, width=64,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    plain = sample()
    pipe.load_lora_weights(str(tmp_path))
    tuned = sample()
    assert (tuned - plain).abs().mean() > 1e-4


# ------------------------------------------------------------------ Ray


def _three_steps(rank: int, cfg, out: Path) -> None:
    """One of two DDP ranks: three fine-tuning steps, then its LoRA weights."""
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    ft = Finetuner(cfg, rank=rank, world=2, wrap=DistributedDataParallel)
    for step in range(3):
        ft.train_step(step)
    save_file(ft.lora_state_dict(), out / f"rank{rank}.safetensors")


@pytest.mark.slow
def test_two_workers_keep_identical_lora(tiny_cfg, tmp_path):
    """Two DDP ranks (gloo, as Ray Train's CPU workers use; the Ray Train path runs in the epoch and resume
    tests) end three steps on the same LoRA weights, and the weights moved."""
    from ddp import run_on_two_ranks

    cfg = tiny_cfg(finetune=dict(lr=0.05, num_steps=2))  # 2 denoising steps, both with gradient
    run_on_two_ranks(_three_steps, cfg, tmp_path)
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)  # it did train


def _weights(directory: Path) -> dict:
    return {**load_file(directory / LORA_FILE), **{f"D.{k}": v for k, v in load_file(directory / DISC_FILE).items()}}


# The fine-tuning every resume test compares with: 4 steps, a checkpoint every 2, made by the CLI after a failed run
# into the same output (test_cli_finetune_end_to_end). Two denoising steps per image, both with gradient: resuming
# does not depend on the chain's length, and the runs' sampling is most of their compute. fp32: a CPU without
# avx512_bf16 runs bf16 about 13x slower (benchmarks/RESULTS.md; the scenario took 502 s of the suite in bf16 on
# such a host), and resuming in bf16 and fp16 is tested without Ray in tests/test_precision.py.
REFERENCE = dict(max_steps=4, lr=0.05, sample_every=2, num_steps=2, grad_steps=1, batch_size=2,
                 cluster=dict(checkpoint_every=2, mixed_precision="no"))
REFERENCE_MODEL = dict(resolution=32)
REFERENCE_FLAGS = ["--max-steps", "4", "--lr", "0.05", "--sample-every", "2", "--num-steps", "2", "--grad-steps", "1",
                   "--batch-size", "2", "--checkpoint-every", "2", "--mixed-precision", "no", "--resolution", "32"]


def _tiny_run(output: Path, max_steps: int = 4, **sections) -> Path:
    """Tiny fine-tuning into `output` with the reference settings, stopped after `max_steps`."""
    settings = {**REFERENCE, "output": str(output), "max_steps": max_steps}
    return finetune(resolve("tiny", overrides={"finetune": settings, "model": REFERENCE_MODEL, **sections}))


def resume_runs(root: Path) -> dict:
    """Scenario `finetune-resume` (tests/scenarios.py), in its own process with its own Ray:
    - the uninterrupted reference, made by the CLI after a run refused for a missing generator into the
      same output;
    - a run stopped after 2 steps, then re-run: it resumes from its step-2 checkpoint, and its worker dies
      hard after step 3, which Ray Train restarts from the same checkpoint.
    Returns the two outputs, the refusal's exit code and last line, and whether the worker died."""
    import contextlib
    import io

    from scenarios import local_ray

    straight, resumed, marker = root / "straight", root / "resumed", root / "worker-died"
    err = io.StringIO()
    with local_ray():
        with contextlib.redirect_stderr(err):
            code = main(["finetune", "--preset", "tiny", "--generator", "nobody-xyz/no-such-model", "--output", str(straight),
                         "--max-steps", "1"])
        assert main(["finetune", "--preset", "tiny", "--output", str(straight), *REFERENCE_FLAGS]) == 0
        _tiny_run(resumed, max_steps=2)  # "stopped" after 2 steps
        _tiny_run(resumed, fault=dict(point="finetune.step", after=1, marker=str(marker)))
    return {"straight": str(straight), "refusal_code": code, "refusal": err.getvalue().strip().splitlines()[-1],
            "resumed": str(resumed), "worker_died": marker.exists()}


SCENARIOS = {"finetune-resume": resume_runs}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.scenario("finetune-resume")
def test_stopped_run_resumes_and_a_killed_worker_restarts_from_the_checkpoint_equal_to_the_uninterrupted_run(scenario):
    """Stopped after 2 steps, the run is re-run: it resumes from its step-2 checkpoint. In that resumed run the
    worker dies hard after step 3, and Ray Train restarts it from the same checkpoint. The result equals the
    uninterrupted run. The log shows where each start began: the stopped run from scratch (steps 1-2), the
    re-run from step 2, and its restarted worker from step 2 again (steps 3-4); a re-run that ignored its
    checkpoint would log a second warm-up and no resume."""
    resumed = Path(scenario["resumed"])
    assert scenario["worker_died"]  # the worker did die, after its first step: step 3
    _assert_same_weights(resumed, Path(scenario["straight"]))
    lines = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [(r.get("phase"), r.get("step"), r.get("resumed_from_step")) for r in lines] == [
        ("warmup", None, None), (None, 1, 0), (None, 2, 0), ("resume", None, 2), ("resume", None, 2), (None, 3, 2), (None, 4, 2)]
    assert (resumed / "samples" / "step-000004.png").exists()


@pytest.mark.ray
def test_resume_refuses_other_settings(ray_local, tiny_cfg, tmp_path):
    from lbgen.config import to_yaml

    (tmp_path / "config.yaml").write_text(to_yaml(tiny_cfg(finetune=dict(lr=0.5, max_steps=99))))
    (tmp_path / "checkpoints" / "checkpoint_2026-01-01").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"\(finetune.lr: 0.5 -> 0.001\)"):
        finetune(tiny_cfg(finetune=dict(output=str(tmp_path))))


@pytest.mark.slow
@pytest.mark.scenario("finetune-resume")
def test_cli_finetune_end_to_end_after_a_failed_run_into_the_same_output(scenario):
    out, refusal = Path(scenario["straight"]), scenario["refusal"]
    assert scenario["refusal_code"] == 2
    assert refusal.startswith("lbgen finetune: error: generator 'nobody-xyz/no-such-model' was not found")
    # The failed run bound nothing: the same output took a valid run.
    for name in (LORA_FILE, DISC_FILE, "config.yaml", "metrics.jsonl",
                 *(f"samples/step-00000{step}.png" for step in (0, 2, 4))):
        assert (out / name).exists(), name
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss_en", "loss_in", "loss_q", "loss_d", "d_acc_real", "d_acc_fake", "grad_norm", "step_time"):
        assert key in record
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all((r["device"], r["precision"]) == ("cpu", "fp32") for r in rows)  # the warm-up line too


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "classes.txt"
    bad.write_text("a x\na y\n")
    assert main(["finetune", "--preset", "tiny", "--classes", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "duplicate class_id 'a'" in err[0] and str(bad) in err[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ fidelity to the paper


def test_discriminator_real_side_embeds_bare_class_names_apart_from_l_in_prompts(tiny_cfg, monkeypatch):
    import lbgen.stages.finetune as finetune_module

    ft = Finetuner(tiny_cfg())
    assert ft.cfg.finetune.real_template == "{name}" and ft.cfg.finetune.clip_template == "photo of {name}"
    bare = ft.clip.encode_text(ft.table.names)
    assert torch.allclose(ft.real_features, bare)
    assert not torch.allclose(ft.loss_fn.text_features, bare)  # L_in keeps its own prompts
    seen = {}
    original = finetune_module.discriminator_loss

    def spy(disc, real, fake):
        seen["real"] = real
        return original(disc, real, fake)

    monkeypatch.setattr(finetune_module, "discriminator_loss", spy)
    ft.train_step(0)
    nearest = torch.cdist(seen["real"], bare).min(dim=1).values
    assert (nearest < 1e-5).all()  # every "real" feature is a bare name's embedding


def test_real_text_comes_from_other_classes_by_default(tiny_cfg, monkeypatch):
    import lbgen.stages.finetune as finetune_module

    assert tiny_cfg().finetune.exclude_own_class and resolve("sd15-in1k").finetune.exclude_own_class
    ft = Finetuner(tiny_cfg(finetune=dict(batch_size=10, d_warmup_passes=2)))
    draws = []
    original = finetune_module.draw_real_classes

    def spy(labels, *args, **kwargs):
        drawn = original(labels, *args, **kwargs)
        draws.append((labels.clone(), drawn))
        return drawn

    monkeypatch.setattr(finetune_module, "draw_real_classes", spy)
    ft.warmup_discriminator()
    labels, drawn = (torch.cat(parts) for parts in zip(*draws))
    assert len(labels) == 20 and not (labels == drawn).any()


def test_gradient_reaches_the_unet_output_at_every_chosen_step(tiny_cfg):
    """The loss reaches each of the K graph-recording UNet calls, the earliest included, through the
    no-grad calls between them (truncated back-propagation, DESIGN 1.1)."""
    ft = Finetuner(tiny_cfg(finetune=dict(num_steps=10, grad_steps=3, gradient_checkpointing=False)))
    unet = ft.sampler.unet
    outputs: list[torch.Tensor | None] = []

    def keep_output(module, args, kwargs, output):
        sample = output.sample if hasattr(output, "sample") else output[0]
        if sample.requires_grad:
            sample.retain_grad()
            outputs.append(sample)
        else:
            outputs.append(None)

    handle = unet.register_forward_hook(keep_output, with_kwargs=True)
    labels = torch.tensor([0, 5])
    gen = seeded_generator(0, "grad-steps")
    cond, uncond = ft._prompt_states(labels)
    chosen = [0, 3, 6]  # the earliest possible start, then T//K apart
    images = ft.sampler(ft._latents(2, gen), cond, uncond, chosen, gen)
    handle.remove()
    ft.loss_fn(images, labels, ft.disc)["loss"].backward()
    assert len(outputs) == 10
    for step, out in enumerate(outputs):
        if step in chosen:
            assert out is not None and out.grad is not None and out.grad.abs().sum() > 0, f"step {step}"
        else:
            assert out is None, f"step {step} recorded a graph"


def test_exported_lora_keeps_its_alpha_through_diffusers_loading(tiny_cfg, tmp_path):
    """Rank 4, alpha 16: the pipeline given the exported file computes what the training-time adapter did."""
    from lbgen.method.sampler import encode_prompts
    from lbgen.models import create_generator
    from lbgen.stages.generate import load_lora_into

    ft = Finetuner(tiny_cfg(finetune=dict(lora_rank=4, lora_alpha=16)))
    with torch.no_grad():  # a trained-looking adapter: gaussian init leaves lora_B at zero
        gen = seeded_generator(0, "lora-b")
        for name, p in ft.pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ft.save(tmp_path, step=0)
    exported = export_lora(tmp_path / "adapter.safetensors", tmp_path, ft.cfg.finetune)
    umask = os.umask(0o022)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o666 & ~umask  # readable to a teammate, as the user's other files

    def noise(unet, pipe):
        latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return unet(latents, 500, encoder_hidden_states=encode_prompts(pipe, ["tench", "church"], "cpu")).sample

    trained = noise(ft.pipe.unet.eval(), ft.pipe)
    for load in ("load_lora_weights", "load_lora_into"):  # diffusers' own call, and generate's
        pipe = create_generator("tiny", resolution=64)
        plain = noise(pipe.unet, pipe)
        if load == "load_lora_weights":
            pipe.load_lora_weights(str(tmp_path))
        else:
            load_lora_into(pipe, str(tmp_path), "tiny")
        loaded = noise(pipe.unet, pipe)
        assert (trained - plain).abs().max() > 1e-2, "the adapter changes the output"
        torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4, msg=load)


def test_a_quality_metric_without_gradient_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    import lbgen.cli

    def ray_starts(address):
        raise AssertionError("Ray started")

    monkeypatch.setattr(lbgen.cli, "init_ray", ray_starts)
    out = tmp_path / "ft"
    assert main(["finetune", "--preset", "tiny", "--iqa", "piqe", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.iqa 'piqe'" in err[0] and "no gradient" in err[0]
    assert not out.exists()
