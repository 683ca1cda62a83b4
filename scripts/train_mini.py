"""Train lbgen's miniature models on the real Fashion-MNIST *train* split and ship them in the package.

    python scripts/train_mini.py                      # full run (~30-40 min on one CPU core), writes lbgen/weights/mini
    python scripts/train_mini.py --scale 0.02 --out /tmp/mini-smoke   # end-to-end smoke run in a minute or two

Three models, all from the 60,000 real train images (the last `--holdout` of a seeded permutation are held
out for the figures; the 10,000 test images are read only to measure CLIP's zero-shot accuracy):

- a text-to-image generator in Stable Diffusion's layout (AutoencoderKL, UNet2DConditionModel conditioned
  through a CLIPTextModel on captions of the class names; epsilon prediction, SD 1.5's noise schedule, 10 %
  caption dropout so that classifier-free guidance works), saved with `save_pretrained`;
- a small open_clip CLIP (ViT image tower, text tower) trained contrastively on the images and class-name captions;
- a no-reference quality CNN (`lbgen.models.iqa.MiniIQA`) regressing 1 - strength of synthetic distortions
  (noise, blur, JPEG, contrast loss) of real images.

The figures it prints (VAE reconstruction, CLIP zero-shot accuracy, IQA rank correlation, CLIP agreement of
generated samples, wall time) are also written to MANIFEST.json with every file's sha256.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lbgen.data.fashion_mnist import read_idx
from lbgen.models.clip import MINI_CLIP_FILES, create_clip
from lbgen.models.generator import SD_SCHEDULER, assemble_pipeline, clip_bpe_tokenizer, create_generator
from lbgen.models.iqa import MINI_IQA_FILES, MiniIQA, create_iqa
from lbgen.models.shipped import file_sha256

# Fashion-MNIST's classes in its own label order (its README); also the shipped `fashion10` class table.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Captions: the generator's prompt ("{name}") and CLIP's ("photo of {name}") among a few phrasings.
TEMPLATES = ("{name}", "photo of {name}", "a photo of a {name}", "a {name}", "{name}, product photo")
SIZE = 32  # 28 x 28 padded by 2 on every side
TEXT_CONTEXT = 16  # tokens: every caption above fits; keeps the text towers' attention small
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- data


def load_split(root: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 32, 32) float in [0, 1] and (N,) int64 labels of split `prefix` ("train" or "t10k")."""
    def find(kind):
        for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz", f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):
            if (root / name).is_file():
                return root / name
        sys.exit(f"{root}: no {prefix} {kind} idx file (install Debian's dataset-fashion-mnist or pass --data)")

    images = torch.from_numpy(read_idx(find("images")).copy()).float().div(255).unsqueeze(1)
    labels = torch.from_numpy(read_idx(find("labels")).astype(np.int64))
    return F.pad(images, (2, 2, 2, 2)), labels


def rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1)


def captions(labels: torch.Tensor, generator: torch.Generator, dropout: float = 0.0) -> list[str]:
    """One caption per label, a template drawn at random; with probability `dropout` the empty prompt."""
    picks = torch.randint(len(TEMPLATES), (len(labels),), generator=generator).tolist()
    drops = (torch.rand(len(labels), generator=generator) < dropout).tolist()
    return ["" if drop else TEMPLATES[t].format(name=CLASS_NAMES[y]) for y, t, drop in zip(labels.tolist(), picks, drops)]


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` index batches over a fresh permutation per epoch."""
    order, at = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if at + batch_size > n:
            order, at = torch.randperm(n, generator=generator), 0
        yield order[at : at + batch_size]
        at += batch_size


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------- generator: VAE, then UNet + text encoder


def build_vae():
    from diffusers import AutoencoderKL

    # Three blocks: 32 -> 8 px (down factor 4), 4 latent channels, as SD's VAE but narrow and without the
    # mid-block attention (at 8 x 8 the convolutions already see the whole image).
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32, 64), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         latent_channels=4, norm_num_groups=16, sample_size=SIZE, mid_block_add_attention=False)


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, generator: torch.Generator):
    """L1 + MSE reconstruction with a small KL term (SD's VAE recipe without its GAN and LPIPS terms)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    for step, index in enumerate(batches(len(images), batch_size, steps, generator)):
        set_lr(optimizer, cosine_lr(step, steps, 1e-3, warmup=min(200, steps // 10 + 1)))
        x = rgb(images[index]) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, (N, 4, 8, 8) each: the UNet samples from them per step."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(rgb(images[i : i + batch_size]) * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_figures(vae, images: torch.Tensor) -> dict:
    """Reconstruction MSE and PSNR in [0, 1] pixels (posterior mean), over held-out train-split images."""
    mean, _ = encode_latents(vae, images)
    recon = torch.cat([vae.decode(mean[i : i + 500]).sample for i in range(0, len(mean), 500)])
    recon = ((recon + 1) / 2).clamp(0, 1).mean(1, keepdim=True)
    mse = F.mse_loss(recon, images, reduction="none").flatten(1).mean(1)
    return {"vae_mse": round(float(mse.mean()), 5), "vae_psnr_db": round(float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()), 2),
            "vae_images": len(images)}


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TEXT_CONTEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        # Cross-attention at 4 x 4 and in the mid block, as SD keeps it off its last, widest level (here the first).
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)


def tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def train_unet(unet, text_encoder, tokenizer, latents, scaling: float, labels, steps: int, batch_size: int, generator: torch.Generator):
    """Epsilon-prediction DDPM training on SD 1.5's schedule; the text encoder learns with the UNet (it starts
    random here, where SD's was CLIP's). Returns the EMA weights' UNet, which samples better after a short run."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    scheduler = DDPMScheduler.from_config(SD_SCHEDULER)
    # The token embeddings stay at their seeded random values (distinct vectors per token are enough for ten
    # classes' captions): 3.2 M of the 3.3 M text-encoder parameters, which AdamW and the EMA would update each step.
    text_encoder.get_input_embeddings().requires_grad_(False)
    params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    ema_text = EMAModel([p for p in text_encoder.parameters() if p.requires_grad], decay=0.999, use_ema_warmup=True)
    mean, std = latents
    unet.train()
    text_encoder.train()
    for step, index in enumerate(batches(len(mean), batch_size, steps, generator)):
        set_lr(optimizer, cosine_lr(step, steps, 1e-3, warmup=min(500, steps // 10 + 1)))
        x0 = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        x0 = x0 * scaling
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        states = text_encoder(tokens(tokenizer, captions(labels[index], generator, dropout=0.1)))[0]
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        ema_text.step([p for p in text_encoder.parameters() if p.requires_grad])
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}")
    ema.copy_to(unet.parameters())
    ema_text.copy_to([p for p in text_encoder.parameters() if p.requires_grad])
    return unet.eval(), text_encoder.eval()


def save_generator(out: Path, vae, unet, text_encoder, tokenizer, scaling: float) -> None:
    vae.register_to_config(scaling_factor=scaling)
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)


# ---------------------------------------------------------------- CLIP


def clip_config() -> dict:
    """open_clip's CLIP keyword arguments: ViT 32 px / patch 4, 3 layers of width 64; a 2-layer text tower of width 32."""
    return {"embed_dim": 64,
            "vision_cfg": {"image_size": SIZE, "patch_size": 4, "width": 64, "layers": 3, "head_width": 32, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": TEXT_CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def train_clip(model, tokenize, mean, std, images, labels, steps: int, batch_size: int, generator: torch.Generator):
    """CLIP's symmetric contrastive loss over the batch's images and its classes' captions.

    A batch of 256 images holds every class many times, so the captions are the batch's distinct classes
    (one template drawn per class and step): image -> caption is a softmax over them, caption -> image a
    softmax over the images with the class's images as positives (averaged), as in supervised CLIP variants.
    """
    model.token_embedding.requires_grad_(False)  # as in the generator's text encoder: seeded random token vectors
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    model.train()
    for step, index in enumerate(batches(len(images), batch_size, steps, generator)):
        set_lr(optimizer, cosine_lr(step, steps, 1e-3, warmup=min(200, steps // 10 + 1)))
        x = (augment(rgb(images[index]), generator) - mean_t) / std_t
        y = labels[index]
        classes = torch.unique(y)
        texts = captions(classes, generator)
        image_features = F.normalize(model.encode_image(x), dim=-1)
        text_features = F.normalize(model.encode_text(tokenize(texts)), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T  # (B, C)
        target = (y[:, None] == classes[None, :]).float()
        loss_i = F.cross_entropy(logits, target.argmax(1))
        loss_t = -(torch.log_softmax(logits.T, dim=1) * target.T / target.T.sum(1, keepdim=True)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 200 == 0 or step == steps - 1:
            log(f"clip step {step}/{steps} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.1f}")
    return model.eval()


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a shift of up to 2 px (the images' padding): CLIP sees generated images too."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


@torch.no_grad()
def zero_shot_accuracy(clip, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of the class whose caption embeddings (averaged over the templates) are nearest, via create_clip's Clip."""
    text = torch.stack([clip.encode_text([t.format(name=n) for t in TEMPLATES]).mean(0) for n in CLASS_NAMES])
    text = F.normalize(text, dim=-1)
    guesses = torch.cat([(clip.encode_image(rgb(images[i : i + 1000])) @ text.T).argmax(1) for i in range(0, len(images), 1000)])
    return float((guesses == labels).float().mean())


# ---------------------------------------------------------------- IQA


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    out = []
    for image in x:
        buffer = io.BytesIO()
        Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(buffer, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.asarray(Image.open(buffer), dtype=np.float32) / 255)[None])
    return torch.stack(out)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    kernel = torch.exp(-torch.arange(-radius, radius + 1).float() ** 2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


# Distortion name -> f(images (N, 1, H, W) in [0, 1], strength in (0, 1], generator): the IQA literature's kinds.
DISTORTIONS = {
    "noise": lambda x, s, g: (x + 0.35 * s * torch.randn(x.shape, generator=g)).clamp(0, 1),
    "blur": lambda x, s, g: blur(x, 0.3 + 1.7 * s),
    "jpeg": lambda x, s, g: jpeg(x, int(round(90 - 85 * s))),
    "contrast": lambda x, s, g: x.mean((2, 3), keepdim=True) + (1 - 0.9 * s) * (x - x.mean((2, 3), keepdim=True)),
}


def distorted_set(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Each image once per distortion at a random strength in [0, 1] (0: the clean image): images, strengths, kinds."""
    xs, ss, kinds = [], [], []
    for name, distort in DISTORTIONS.items():
        strength = torch.rand(len(images), generator=generator)
        strength[torch.rand(len(images), generator=generator) < 0.1] = 0.0  # clean images at the top of the scale
        out = torch.cat([distort(images[i : i + 1], float(s), generator) if s > 0 else images[i : i + 1] for i, s in enumerate(strength)])
        xs.append(out)
        ss.append(strength)
        kinds += [name] * len(images)
    return torch.cat(xs), torch.cat(ss), kinds


def train_iqa(model, images, strengths, steps: int, batch_size: int, generator: torch.Generator):
    """Regress quality = 1 - strength, plus a pairwise ranking term (RankIQA's idea) so the order is learnt first."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for step, index in enumerate(batches(len(images), batch_size, steps, generator)):
        set_lr(optimizer, cosine_lr(step, steps, 2e-3, warmup=min(100, steps // 10 + 1)))
        x, s = augment(rgb(images[index]), generator), strengths[index]
        score = model(x)
        target = 1 - s
        diff = target[:, None] - target[None, :]
        rank = F.relu(0.05 - (score[:, None] - score[None, :]) * diff.sign())[diff.abs() > 0.1].mean()
        loss = F.mse_loss(score, target) + rank
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"iqa step {step}/{steps} loss {loss.item():.4f}")
    return model.eval()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@torch.no_grad()
def iqa_figures(quality, images, strengths, kinds) -> dict:
    """Spearman rank correlation of the shipped scorer (create_iqa's score01) with 1 - strength, overall and per kind."""
    scores = torch.cat([quality(rgb(images[i : i + 1000])) for i in range(0, len(images), 1000)])
    figures = {"iqa_spearman": round(spearman(scores, 1 - strengths), 4), "iqa_images": len(images)}
    for name in DISTORTIONS:
        mask = torch.tensor([k == name for k in kinds])
        figures[f"iqa_spearman_{name}"] = round(spearman(scores[mask], 1 - strengths[mask]), 4)
    return figures


# ---------------------------------------------------------------- samples through the product path


@torch.no_grad()
def sample_figures(generator_dir: Path, clip, seed: int, per_class: int, steps: int, grid: Path | None) -> dict:
    """Load the saved generator through `create_generator`, sample `per_class` images per class (DDIM, CFG 3)
    and report how often the trained CLIP's zero-shot guess is the prompted class."""
    from lbgen.models.generator import create_scheduler

    pipe = create_generator(str(generator_dir))
    pipe.scheduler = create_scheduler("ddim", pipe.scheduler.config)
    images, labels = [], []
    for label, name in enumerate(CLASS_NAMES):
        out = pipe([name] * per_class, num_inference_steps=steps, guidance_scale=3.0, output_type="pt",
                   generator=torch.Generator().manual_seed(seed * 1000 + label)).images
        images.append(out.float())
        labels += [label] * per_class
    images, labels = torch.cat(images), torch.tensor(labels)
    if grid is not None:
        from torchvision.utils import save_image

        save_image(images, grid, nrow=per_class)
    text = F.normalize(torch.stack([clip.encode_text([t.format(name=n) for t in TEMPLATES]).mean(0) for n in CLASS_NAMES]), dim=-1)
    guesses = (clip.encode_image(images) @ text.T).argmax(1)
    return {"sample_clip_agreement": round(float((guesses == labels).float().mean()), 4), "sample_images": len(labels),
            "sample_steps": steps}


# ---------------------------------------------------------------- shipping


def write_manifest(out: Path, command: str, figures: dict) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    manifest = {
        "command": command,
        "data": "Fashion-MNIST train split (60,000 images; the test split only for CLIP's zero-shot figure)",
        "figures": figures,
        "bytes": sum(p.stat().st_size for p in files),
        "files": {p.relative_to(out).as_posix(): file_sha256(p) for p in files},
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def write_tensors(path: Path, module: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}, str(path))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEBIAN_DIR, help="folder with Fashion-MNIST's idx files (gzipped or not)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "lbgen" / "weights" / "mini"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step count (0.02: a smoke run)")
    parser.add_argument("--holdout", type=int, default=2000, help="train-split images held out for the figures")
    parser.add_argument("--samples", default="/tmp/mini_samples.png", help="where the grid of generated samples goes (not shipped)")
    # One thread: on a 2-core host shared with other work, two OpenMP threads wait on each other at every
    # barrier (a UNet step measured 6.4 s with 2 threads under load, against 0.7 s on the idle host).
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


# Steps and batch sizes of the full run (--scale 1), sized for ~30 minutes on one core of a busy 2-core host.
STEPS = {"vae": 600, "unet": 1200, "clip": 500, "iqa": 600}
BATCH = {"vae": 32, "unet": 64, "clip": 128, "iqa": 64}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    steps = {k: max(2, int(v * args.scale)) for k, v in STEPS.items()}
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    images, labels = load_split(Path(args.data), "train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    held, train = order[-args.holdout :], order[: -args.holdout]
    log(f"Fashion-MNIST train: {len(train)} for training, {len(held)} held out; steps {steps}")
    figures: dict = {"seed": args.seed, "scale": args.scale, "steps": steps}

    def rng(offset: int) -> torch.Generator:  # one stream per model: each stays reproducible alone
        return torch.Generator().manual_seed(args.seed * 100 + offset)

    # Generator
    torch.manual_seed(args.seed)
    vae = train_vae(build_vae(), images[train], steps["vae"], BATCH["vae"], rng(1))
    figures.update(vae_figures(vae, images[held]))
    log(f"VAE reconstruction on {len(held)} held-out images: MSE {figures['vae_mse']}, PSNR {figures['vae_psnr_db']} dB")
    latents = encode_latents(vae, images[train])
    scaling = float(1.0 / latents[0].std())  # SD's `scaling_factor`: the diffusion sees unit-variance latents
    tokenizer = clip_bpe_tokenizer(model_max_length=TEXT_CONTEXT)
    unet, text_encoder = train_unet(build_unet(), build_text_encoder(tokenizer), tokenizer, latents, scaling, labels[train],
                                    steps["unet"], BATCH["unet"], rng(2))
    save_generator(tmp / "generator", vae, unet, text_encoder, tokenizer, scaling)

    # CLIP
    import open_clip

    config = clip_config()
    torch.manual_seed(args.seed + 3)
    model = open_clip.CLIP(**config)
    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=TEXT_CONTEXT)
    model = train_clip(model, tokenize, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, images[train], labels[train],
                       steps["clip"], BATCH["clip"], rng(3))
    (tmp / "clip").mkdir()
    (tmp / "clip" / MINI_CLIP_FILES[0]).write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {
        "size": SIZE, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}, indent=1) + "\n")
    write_tensors(tmp / "clip" / MINI_CLIP_FILES[1], model)

    # IQA
    torch.manual_seed(args.seed + 4)
    iqa_train = train[: min(len(train), 8000)]
    x, s, _ = distorted_set(images[iqa_train], rng(4))
    iqa = train_iqa(MiniIQA(), x, s, steps["iqa"], BATCH["iqa"], rng(5))
    (tmp / "iqa").mkdir()
    (tmp / "iqa" / MINI_IQA_FILES[0]).write_text(json.dumps(iqa.config, indent=1) + "\n")
    write_tensors(tmp / "iqa" / MINI_IQA_FILES[1], iqa)

    # Figures through the package's own factories, from the fp16 files just written.
    clip = create_clip(str(tmp / "clip"))
    test_images, test_labels = load_split(Path(args.data), "t10k")
    figures["clip_zero_shot_test_top1"] = round(zero_shot_accuracy(clip, test_images, test_labels), 4)
    log(f"CLIP zero-shot top-1 on the {len(test_labels)} real test images: {figures['clip_zero_shot_test_top1']:.4f}")
    hx, hs, hk = distorted_set(images[held], rng(6))
    figures.update(iqa_figures(create_iqa(str(tmp / "iqa")), hx, hs, hk))
    log(f"IQA Spearman with 1 - strength on {len(hs)} held-out distorted images: {figures['iqa_spearman']}")
    figures.update(sample_figures(tmp / "generator", clip, args.seed, per_class=10, steps=25, grid=Path(args.samples)))
    log(f"generated samples recognised by CLIP as their class: {figures['sample_clip_agreement']}")

    figures["seconds"] = round(time.perf_counter() - started, 1)
    command = "python scripts/train_mini.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    write_manifest(tmp, command, figures)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = json.loads((out / "MANIFEST.json").read_text())["bytes"]
    log(f"wrote {out} ({size / 1e6:.1f} MB); wall time {figures['seconds'] / 60:.1f} min")
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
