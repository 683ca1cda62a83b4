"""Presets: named nested dicts of overrides on top of the dataclass defaults (the paper's settings).

`tiny` runs the whole machinery with small random models on a CPU; `mini` runs it on the small real models
trained on Fashion-MNIST that ship in the package; `sd15-shape` has the real
architectures with random weights; `sd15-in1k` is the paper's ImageNet-1K setup on 8 GPUs.
A preset applies only when asked for (`--preset`, or a config file's `preset:` key).
"""

from __future__ import annotations

from typing import Any

# SD 1.5's UNet/VAE/text encoder and CLIP ViT-L/14 with random weights: the real workload's
# shapes (speed, memory) without a download. The IQA stays the tiny CNNIQA: pyiqa's NR metrics
# cannot be built without their weights.
SD15_SHAPE_MODELS = {"generator": "sd15-shape", "clip": "ViT-L-14", "clip_pretrained": None, "iqa": "tiny", "resolution": 512}

TINY_MODELS = {"generator": "tiny", "clip": "tiny", "clip_pretrained": None, "iqa": "tiny", "resolution": 64}

# The small SD, CLIP and quality CNN trained on real Fashion-MNIST that ship in the package (lbgen/weights/mini,
# remade by scripts/train_mini.py): 32 px images, 8 x 8 x 4 latents.
MINI_MODELS = {"generator": "mini", "clip": "mini", "clip_pretrained": None, "iqa": "mini", "resolution": 32}

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's ImageNet-1K setup: SD 1.5, CLIP ViT-L/14 (OpenAI), 8 GPUs x batch 4.
    "sd15-in1k": {
        "finetune": {"cluster": {"workers": 8, "use_gpu": True}},
        # 8 GPUs x 256 images: the linear scaling rule's lr 0.1 x 2048 / 256. JPEGs decoded on the GPUs (nvJPEG): a
        # p4d's 96 vCPUs (hyperthreads) cannot decode the ~20,000 images/s eight A100s train on (README, "Feeding
        # the GPUs"). Two CPUs per worker: its loop and Ray Data's batch formatting; the rest go to Ray Data.
        "pretrain": {"cluster": {"workers": 8, "use_gpu": True, "cpus_per_worker": 2.0}, "lr": 0.8, "decode_device": "cuda"},
    },
    # Seeded random small models, 10 classes: the whole machinery on 2 CPU cores in minutes.
    "tiny": {
        "classes": "tiny10",
        "model": TINY_MODELS,
        "finetune": {
            "output": "runs/tiny/finetune",
            "cluster": {"use_gpu": False, "checkpoint_every": 5, "mixed_precision": "no"},
            "batch_size": 4,
            "max_steps": 20,
            "num_steps": 10,
            "grad_steps": 2,
            "lora_rank": 4,
            "lora_alpha": 4,
            "lr": 1e-3,
            "d_hidden": 32,
            "d_lr": 1e-3,
            "sample_every": 10,
        },
        "pretrain": {
            "output": "runs/tiny/pretrain",
            # Half a CPU: on a 2-CPU machine Ray Data needs the rest (ENVIRONMENT: Train + Data deadlock).
            "cluster": {"use_gpu": False, "cpus_per_worker": 0.5, "mixed_precision": "no"},
            # timm's 0.4M-parameter test ResNet: learns the procedural shapes in seconds at 32 px on CPU.
            "model": "test_resnet",
            "epochs": 2,
            "batch_size": 32,
            "opt": "adamw",
            "lr": 3e-3,
            "weight_decay": 0.05,
            "warmup_epochs": 0.2,
            "image_size": 32,
            "crop_scale": [0.35, 1.0],
            "val_fraction": 0.1,
            "decode_batch_size": 32,
            "read_block_rows": 64,
            "shuffle_buffer": 256,
        },
        "evaluate": {
            "output": "runs/tiny/evaluate",
            "fractions": [0.1, 0.5, 1.0],
            "eval_image_size": 32,
            "eval_batch_size": 64,
            "probe_max_iter": 100,
            "ft_epochs": 3,
            "ft_lr": 1e-3,
            "ft_batch_size": 32,
            "loader_workers": 0,
            "task_cpus": 1.0,
            "task_gpus": 0.0,
        },
        "make_downstream": {"output": "runs/tiny/downstream/shapes", "train_per_class": 40, "test_per_class": 20, "size": 32},
        "run": {"output": "runs/tiny"},
        "generate": {
            "output": "runs/tiny/generate",
            "use_gpu": False,
            "images_per_class": 8,
            "steps": 4,
            "batch_size": 4,
            "micro_batch": 4,
            "dtype": "fp32",
            "cpus_per_worker": 0.5,
            "image_format": "png",
            "rows_per_shard": 20,
            "row_group_rows": 10,
        },
    },
    # The trained miniature on real Fashion-MNIST: every stage on real models in minutes on 2 CPU cores, judged on
    # real held-out test images (the whole test split with Debian's dataset-fashion-mnist, else a shipped subset).
    "mini": {
        "classes": "fashion10",
        "model": MINI_MODELS,
        "finetune": {
            "output": "runs/mini/finetune",
            "cluster": {"use_gpu": False, "checkpoint_every": 10, "mixed_precision": "no"},
            # 5 classes a step, 8 denoising steps (2 with a graph): ~2 s a step on one core; no recomputation, the
            # activations of a 32 px model are small.
            "batch_size": 5,
            "max_steps": 20,
            "num_steps": 8,
            "grad_steps": 2,
            "guidance": 3.0,
            "gradient_checkpointing": False,
            "lora_rank": 8,
            "lora_alpha": 8,
            "lr": 2e-4,
            "d_hidden": 64,
            "d_lr": 1e-3,
            "sample_every": 10,
            "sample_classes": 10,
        },
        "generate": {
            "output": "runs/mini/generate",
            "use_gpu": False,
            "images_per_class": 40,
            "steps": 15,
            "scheduler": "ddim",
            "guidance": 3.0,
            "batch_size": 20,
            "micro_batch": 10,
            "dtype": "fp32",
            "cpus_per_worker": 0.5,
            "threads": 1,
            "image_format": "png",
            "rows_per_shard": 200,
            "row_group_rows": 50,
        },
        "make_downstream": {"output": "runs/mini/downstream", "kind": "fashion-mnist", "train_per_class": 100, "test_per_class": 1000,
                            "size": 32},
        "pretrain": {
            "output": "runs/mini/pretrain",
            "cluster": {"use_gpu": False, "cpus_per_worker": 0.5, "mixed_precision": "no"},
            "model": "test_resnet",
            "epochs": 8,
            "batch_size": 32,
            "opt": "adamw",
            "lr": 3e-3,
            "weight_decay": 0.05,
            "warmup_epochs": 0.5,
            "image_size": 32,
            "crop_scale": [0.5, 1.0],
            "val_fraction": 0.1,
            "decode_batch_size": 64,
            "read_block_rows": 64,
            "shuffle_buffer": 600,
        },
        "evaluate": {
            "output": "runs/mini/evaluate",
            "also_classify": True,
            "fractions": [0.1, 0.5, 1.0],
            "eval_image_size": 32,
            "eval_batch_size": 250,
            "probe_max_iter": 100,
            "loader_workers": 0,
            "task_cpus": 1.0,
            "task_gpus": 0.0,
        },
        "run": {"output": "runs/mini"},
    },
    # The real SD 1.5 / CLIP ViT-L/14 architectures, random weights: figures of the real workload.
    "sd15-shape": {
        "classes": "tiny10",
        "model": SD15_SHAPE_MODELS,
        "finetune": {"output": "runs/sd15-shape/finetune", "max_steps": 2},
        "generate": {"output": "runs/sd15-shape/generate", "images_per_class": 8},
    },
}


# Training recipes by `pretrain.recipe`: the pretrain fields each sets. They apply over the preset and under a
# config file's and the flags' own values, so a preset's optimiser settings (made for one recipe) never leak
# into another, and a value the user gives always wins.
RECIPES: dict[str, dict[str, Any]] = {
    # The dataclass defaults: SGD with Nesterov momentum, cosine with warm-up, label smoothing (ResNets).
    "resnet": {},
    # DeiT (Touvron et al., 2021), the recipe that trains ViT-S on ImageNet without extra data: AdamW, lr 5e-4
    # per 512 images scaled to the global batch, weight decay 0.05, 5 warm-up epochs, mixup 0.8 / cutmix 1.0,
    # label smoothing 0.1, stochastic depth 0.1. (Its RandAugment and random erasing are not applied here.)
    "deit": {"opt": "adamw", "lr": 5e-4, "lr_base_batch": 512, "weight_decay": 0.05, "warmup_epochs": 5.0, "warmup_lr": 1e-6,
             "min_lr": 1e-5, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "drop_path": 0.1},
}
