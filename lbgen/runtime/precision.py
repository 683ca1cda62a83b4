"""Precision settings and what they mean on any device: autocast, weight dtypes, the fp16 loss scaler.

The names and their dtype names are config's (`lbgen.config.choices`), torch-free: the CLI's
`--help` and input checks must not load torch. The same setting means the same thing on a
GPU and on a CPU, so every GPU code path can be exercised on a CPU.
"""

from __future__ import annotations

import contextlib

from lbgen.config.choices import MIXED_PRECISION, WEIGHT_DTYPES


def weight_dtype(name: str):
    """The torch dtype of `generate.dtype` setting `name`."""
    import torch

    return getattr(torch, WEIGHT_DTYPES[name])


def device_label(device) -> str:
    """How a device is recorded in metrics and manifests: "cpu", "cuda:0 (NVIDIA H200)"."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


class MixedPrecision:
    """One training process's mixed precision on its device: autocast, frozen-weight dtype, loss scaler.

    fp16 scales the loss (GradScaler) on every device where torch has a scaler for it (CUDA and CPU);
    bf16 needs no scaling; "no" trains in fp32.
    """

    def __init__(self, name: str, device):
        import torch

        self.name = name
        self.device = torch.device(device)
        dtype_name = MIXED_PRECISION[name]
        self.dtype = getattr(torch, dtype_name) if dtype_name else None

    @property
    def weight_dtype(self):
        """The dtype of frozen weights: the autocast dtype, so they are cast once, not per op."""
        import torch

        return self.dtype or torch.float32

    def autocast(self):
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self):
        import torch

        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

    def record(self) -> dict[str, str]:
        """The `device` and `precision` keys of every metrics row: how the numbers were made."""
        return {"device": device_label(self.device), "precision": self.name if self.dtype is not None else "fp32"}
