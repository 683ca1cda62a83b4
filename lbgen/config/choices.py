"""The names a setting may take: the vocabularies config checks values against, on the lowest floor.

Which names a setting accepts is a fact about the settings, so it lives here, and the modules that
give a name its meaning (`runtime.precision`, `runtime.faults`, `data.images`, `data.shapes`,
`stages.protocols`) import it from here: config never imports upward. Plain data: no torch, no I/O.
"""

from __future__ import annotations

# `finetune.cluster.mixed_precision` / `pretrain.cluster.mixed_precision` -> torch dtype name of the autocast (None: fp32).
MIXED_PRECISION = {"bf16": "bfloat16", "fp16": "float16", "no": None}
# `generate.dtype` -> torch dtype name of the generation model's weights.
WEIGHT_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}

# `generate.compile`: torch.compile's mode for the generation UNet (and, with `generate.compile_vae`, the VAE's
# decoder); "none" leaves them uncompiled.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")

# `generate.fast_paths`: the fast paths of generation that `generate.fast` takes, each keeping the eager path's pixels
# up to the last bits (`FastPath` in lbgen.stages.generate gives them their meaning), with what each does.
FAST_PATHS = {
    "sync_free": "the sync-free denoising loop (lbgen.method.sync_free): the scheduler's coefficients and each "
                 "image's noise on the device, no host round trip per step, the guidance's text states stacked once",
    "unload_lora": "the fine-tuned LoRA merged and its adapter layers removed",
    "require_sdpa": "every attention layer required to run SDPA: an error, naming the processors, otherwise",
    "fused_qkv": "fused QKV projections in the UNet's and VAE's attention",
    "channels_last": "a channels_last UNet, VAE and latents",
    "cudnn_benchmark": "cuDNN's autotuner on a GPU (the padded micro-batch has one shape)",
    "prompt_cache": "each class prompt encoded once per actor",
}

# `pretrain.decode_device`: where training images are decoded and cropped (`lbgen.data.transforms.DECODE_STAGES`):
# in Ray Data's CPU tasks, or on the training GPUs with nvJPEG (the CPU tasks then only draw the crops).
DECODE_DEVICES = ("cpu", "cuda")

# `fault.point`: where a test's fault can fire: inside `GenerateBatch` (after a micro-batch's denoising,
# before its decoding), and in the fine-tuning loop after a step (its metrics logged and any checkpoint reported).
FAULT_POINTS = ("generate.batch", "finetune.step")

# `generate.image_format` -> (PIL format, file extension of the image's `path`).
IMAGE_FORMATS: dict[str, tuple[str, str]] = {"jpeg": ("JPEG", "jpg"), "png": ("PNG", "png"), "webp": ("WEBP", "webp")}

# `make_downstream.kind`: the sets `lbgen.data.shapes.KINDS` writes (procedural shapes; real Fashion-MNIST).
DOWNSTREAM_KINDS = ("shapes", "shapes-in9", "fashion-mnist")

# `evaluate.protocol` -> the protocol class, as "module:attribute" (imported when used: `stages.protocols`).
PROTOCOLS = {
    # Frozen features + a standardised logistic-regression probe per fraction.
    "linear": "lbgen.stages.evaluate:LinearProtocol",
    # The whole backbone and a new head fine-tuned per fraction.
    "finetune": "lbgen.stages.evaluate:FinetuneProtocol",
    # The backbone's own classifier, untrained further, on real images of its classes keyed by class_id.
    "classify": "lbgen.stages.classify:ClassifyProtocol",
}
