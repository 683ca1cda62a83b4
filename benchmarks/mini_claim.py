"""The paper's claim in miniature: does lbGen fine-tuning make a better training set, judged on real images?

    python benchmarks/mini_claim.py --json /tmp/claim.json [--seeds 0 1 2] [--per-class 40] [--samplers]

On the shipped `mini` models and the real Fashion-MNIST test split (Debian's `dataset-fashion-mnist`, else the
shipped subset), for each seed and arm:

- real -> real: `--per-class` real train images per class (the ceiling at that size);
- base -> real: images of the generator as trained, no fine-tuning;
- lbgen -> real: after lbGen fine-tuning with the preset's L = w_en L_en + w_in L_in + lambda_q L_q, and after
  each loss alone (en, in, q: the other weights set to 0).

Every arm's images train the same CNN with the same recipe (the `mini` preset's pre-training: `Pretrainer`),
which then classifies the real test images (synthetic-to-real top-1). A judge CNN trained on `--judge-images`
real train images gives the rest: the share of an arm's images it assigns to their own class, per-class
diversity (mean pairwise cosine distance of its features within a class) and the Frechet distance between the
arm's images and the real test images in its feature space (at equal sample size, so the real arm is the
floor). `--samplers` adds the sampler table: the base generator with DDPM, PNDM, DDIM, DPM-Solver++ and Euler
at each of `--steps`, the same metrics, and the UNet calls per image counted on the model.

It runs the stages' own plain-PyTorch pieces in one process (`Finetuner.train_step`, the `GenerateBatch`
callable, `Pretrainer.train_step`), the code that Ray runs inside `lbgen finetune/generate/pretrain`, without
Ray's start-up per arm. Prints progress to stderr and one JSON document to stdout (and `--json FILE`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from lbgen.config import Config
from lbgen.config.io import resolve
from lbgen.data.classes import load_class_table
from lbgen.data.downstream import ArrayImages
from lbgen.data.fashion_mnist import load_split, padded_rgb, per_class_sample, source_dir
from lbgen.data.plan import plan
from lbgen.stages.finetune import ADAPTER_FILE, Finetuner, export_lora, total_steps
from lbgen.stages.generate import GenerateBatch
from lbgen.stages.pretrain import Pretrainer, memory_batches, pretrain_in_memory

CLASSES = list(load_class_table("fashion10").ids)  # Fashion-MNIST's own labels, "0".."9"

# Loss weights of each fine-tuned arm, over the preset's (the paper's weights); {} keeps them all.
LOSS_ARMS: dict[str, dict] = {
    "lbgen": {},
    "en": {"w_in": 0.0, "lambda_q": 0.0},
    "in": {"w_en": 0.0, "lambda_q": 0.0},
    "q": {"w_en": 0.0, "w_in": 0.0},
}
SAMPLERS = ("ddpm", "pndm", "ddim", "dpm++", "euler")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data

def real_images(split: str) -> ArrayImages:
    """Fashion-MNIST's 28 px padded to 32, grey to RGB, as `make-downstream --kind fashion-mnist` writes them."""
    images, labels = load_split(split)
    return ArrayImages(padded_rgb(images), labels, CLASSES)


def subset(images: ArrayImages, keep: np.ndarray) -> ArrayImages:
    return ArrayImages(images.array[keep], images.targets[keep], images.classes)


# ---------------------------------------------------------------- the three stages, in process

def finetune_lora(cfg: Config, directory: Path) -> Path:
    """Fine-tune as `lbgen finetune` does (discriminator warm-up, then `total_steps` steps); `directory`, now
    holding the exported LoRA."""
    finetuner = Finetuner(cfg)
    finetuner.warmup_discriminator()
    for step in range(total_steps(cfg, len(finetuner.table))):
        finetuner.train_step(step)
    save_file(finetuner.lora_state_dict(), directory / ADAPTER_FILE)
    export_lora(directory / ADAPTER_FILE, directory, cfg.finetune)
    return directory


class CallCounter:
    """Counts a module's forward calls (a UNet's: one per denoising step, both CFG halves in one call)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1


def generate_images(cfg: Config) -> tuple[ArrayImages, float]:
    """All of `cfg`'s images through the `GenerateBatch` callable, and the UNet calls each took."""
    rows = plan(load_class_table(cfg.classes), cfg)
    generate = GenerateBatch(dataclasses.asdict(cfg))
    counter = CallCounter(generate.pipe.unet)
    batch = {"seed": np.array([r["seed"] for r in rows]), "prompt": np.array([r["prompt"] for r in rows])}
    pixels = generate(batch)["pixels"]
    micro_batches = -(-len(rows) // cfg.generate.micro_batch)
    return ArrayImages(pixels, np.array([r["label"] for r in rows]), CLASSES), counter.calls / micro_batches


@torch.no_grad()
def predict(trainer: Pretrainer, images: ArrayImages, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels and pre-logit features (N, D) of `images` after the eval transform."""
    model = trainer.model.eval()
    predictions, features = [], []
    for batch in memory_batches(images, cfg, train=False, batch_size=500):
        pooled = model.forward_head(model.forward_features(trainer._inputs(batch["image"])), pre_logits=True)
        predictions.append(model.get_classifier()(pooled).argmax(1).numpy())
        features.append(pooled.numpy())
    return np.concatenate(predictions), np.concatenate(features)


# ---------------------------------------------------------------- metrics

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D), as FID computes it."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def class_diversity(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the mean pairwise cosine distance between a class's feature vectors."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    spreads = []
    for label in np.unique(labels):
        members = unit[labels == label]
        n = len(members)
        cosine = members @ members.T
        spreads.append(1 - (cosine.sum() - n) / (n * (n - 1)))
    return float(np.mean(spreads))


@dataclasses.dataclass
class Judge:
    """A CNN trained on real images, and the real test set in its eyes."""

    cfg: Config
    trainer: Pretrainer
    test: ArrayImages
    test_features: np.ndarray
    accuracy: float

    def measure(self, images: ArrayImages, cnn_cfg: Config) -> dict:
        """The four figures of one arm's images."""
        predicted, features = predict(self.trainer, images, self.cfg)
        cnn = pretrain_in_memory(cnn_cfg, images)
        on_real = cnn.evaluate(memory_batches(self.test, cnn_cfg, train=False, batch_size=500))
        # The real test set subsampled to the arm's size: Frechet distances are biased by sample size.
        pick = np.random.default_rng(0).choice(len(self.test_features), size=len(images.targets), replace=False)
        return {
            "top1_on_real": on_real["val_acc"],
            "own_class_share": float((predicted == images.targets).mean()),
            "class_diversity": class_diversity(features, images.targets),
            "frechet_distance": frechet_distance(features, self.test_features[pick]),
        }


def train_judge(cfg: Config, count: int, epochs: int) -> Judge:
    train = real_images("train")
    cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, epochs=epochs))
    trainer = pretrain_in_memory(cfg, subset(train, per_class_sample(train.targets, count // 10, seed=12345)))
    test = real_images("test")
    predicted, features = predict(trainer, test, cfg)
    return Judge(cfg, trainer, test, features, float((predicted == test.targets).mean()))


# ---------------------------------------------------------------- arms

def seed_config(seed: int, per_class: int, threads: int, finetune: dict | None = None, generate: dict | None = None) -> Config:
    overrides = {"seed": seed, "generate": {"images_per_class": per_class, "threads": threads, "batch_size": 50, "micro_batch": 50,
                                            **(generate or {})}}
    if finetune is not None:
        overrides["finetune"] = finetune
    return resolve("mini", overrides=overrides)


def finetune_overrides(args) -> dict:
    """The fine-tuning settings given on the command line (none: the preset's)."""
    given = {"max_steps": args.finetune_steps, "lr": args.finetune_lr}
    return {key: value for key, value in given.items() if value is not None}


def claim_arms(seed: int, args, judge: Judge, work: Path) -> dict:
    """{arm: figures} for one seed."""
    cfg = seed_config(seed, args.per_class, args.threads)
    train = real_images("train")
    found = {"real": judge.measure(subset(train, per_class_sample(train.targets, args.per_class, seed)), cfg)}
    log(f"seed {seed} real: {found['real']}")
    found["base"] = judge.measure(generate_images(cfg)[0], cfg)
    log(f"seed {seed} base: {found['base']}")
    for arm in args.loss_arms:
        weights = {**LOSS_ARMS[arm], **finetune_overrides(args)}
        arm_cfg = seed_config(seed, args.per_class, args.threads, finetune=weights)
        lora_dir = work / f"lora-{arm}-{seed}"
        lora_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        lora = finetune_lora(arm_cfg, lora_dir)
        arm_cfg = seed_config(seed, args.per_class, args.threads, finetune=weights, generate={"lora": str(lora)})
        found[arm] = judge.measure(generate_images(arm_cfg)[0], arm_cfg)
        log(f"seed {seed} {arm} ({time.perf_counter() - started:.0f} s): {found[arm]}")
    return found


def sampler_arms(seed: int, args, judge: Judge) -> dict:
    """{"sampler@steps": figures + unet_calls} of the base generator, for one seed."""
    found = {}
    for sampler in SAMPLERS:
        for steps in args.steps:
            cfg = seed_config(seed, args.sampler_per_class, args.threads, generate={"scheduler": sampler, "steps": steps})
            started = time.perf_counter()
            images, calls = generate_images(cfg)
            seconds = time.perf_counter() - started
            found[f"{sampler}@{steps}"] = {**judge.measure(images, cfg), "unet_calls": calls,
                                           "generate_s_per_image": seconds / len(images.targets)}
            log(f"seed {seed} {sampler}@{steps}: {found[f'{sampler}@{steps}']}")
    return found


def summarise(per_seed: list[dict]) -> dict:
    """{arm: {figure: {"mean", "sd", "values"}}} over seeds."""
    out = {}
    for arm in per_seed[0]:
        out[arm] = {}
        for figure in per_seed[0][arm]:
            values = [seed_result[arm][figure] for seed_result in per_seed]
            out[arm][figure] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                                "values": values}
    return out


def within_noise(arm: dict, reference: dict, figure: str, seeds: int) -> bool:
    """Whether `arm`'s mean of `figure` is no worse than `reference`'s by more than two standard errors of the difference."""
    a, r = arm[figure], reference[figure]
    margin = 2 * ((a["sd"] ** 2 + r["sd"] ** 2) / seeds) ** 0.5
    worse = r["mean"] - a["mean"] if figure != "frechet_distance" else a["mean"] - r["mean"]
    return worse <= margin


def cheapest_within_noise(samplers: dict, seeds: int, reference: str = "ddpm@50") -> str | None:
    """The setting with the fewest UNet calls whose top-1, own-class share and Frechet distance are within noise of
    `reference`; None when `--steps` left the reference out of the table."""
    if reference not in samplers:
        return None
    figures = ("top1_on_real", "own_class_share", "frechet_distance")
    ok = [name for name, arm in samplers.items() if all(within_noise(arm, samplers[reference], f, seeds) for f in figures)]
    return min(ok, key=lambda name: samplers[name]["unet_calls"]["mean"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the JSON document to this file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--per-class", type=int, default=40, help="images per class of every arm, as `lbgen run --preset mini` makes (default: 40)")
    parser.add_argument("--judge-images", type=int, default=10000, help="real train images the judge CNN learns from (default: 10000)")
    parser.add_argument("--judge-epochs", type=int, default=4, help="the judge's epochs (default: 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning steps of the lbGen arms (default: the preset's, 20)")
    parser.add_argument("--finetune-lr", type=float, help="LoRA learning rate of the lbGen arms (default: the preset's, 2e-4)")
    parser.add_argument("--loss-arms", nargs="+", choices=list(LOSS_ARMS), default=list(LOSS_ARMS),
                        help="fine-tuned arms: all losses, or one alone (default: all four)")
    parser.add_argument("--no-claim", dest="claim", action="store_false", help="skip the real/base/lbGen arms")
    parser.add_argument("--samplers", action="store_true", help="add the sampler table")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50], help="sampler table's step counts (default: 10 20 50)")
    parser.add_argument("--sampler-per-class", type=int, default=20, help="images per class of each sampler setting (default: 20)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.set_num_threads(args.threads)  # GenerateBatch sets the same count (generate.threads)
    judge_cfg = seed_config(0, args.per_class, args.threads)
    judge = train_judge(judge_cfg, args.judge_images, args.judge_epochs)
    log(f"judge: {judge.accuracy:.4f} top-1 on {len(judge.test.targets)} real test images")
    found: dict = {"data": str(source_dir()), "test_images": len(judge.test.targets), "seeds": args.seeds, "per_class": args.per_class,
                   "judge": {"train_images": args.judge_images, "epochs": args.judge_epochs, "top1_on_real": judge.accuracy},
                   "loss_arms": {arm: LOSS_ARMS[arm] for arm in args.loss_arms}, "finetune": finetune_overrides(args) or "preset"}
    with tempfile.TemporaryDirectory() as work:
        if args.claim:
            found["arms"] = summarise([claim_arms(seed, args, judge, Path(work)) for seed in args.seeds])
    if args.samplers:
        samplers = summarise([sampler_arms(seed, args, judge) for seed in args.seeds])
        found["samplers"] = {"per_class": args.sampler_per_class, "steps": args.steps, "table": samplers,
                             "cheapest_within_noise_of_ddpm@50": cheapest_within_noise(samplers, len(args.seeds))}
    found["seconds"] = round(time.perf_counter() - started)
    text = json.dumps(found, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return found


if __name__ == "__main__":
    main()
