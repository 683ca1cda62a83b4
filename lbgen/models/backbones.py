"""Backbone weights as lbgen exports them, and the specs `evaluate` accepts.

`export_backbone` writes `backbone.safetensors` (the whole timm state dict,
classifier included) and `model.json` (timm name, class table, preprocessing,
and the `pretrained_cfg` overlay that loads it). The export loads with plain timm:

    meta = json.load(open("model.json"))
    timm.create_model(meta["model"], pretrained=True, num_classes=meta["num_classes"],
                      pretrained_cfg_overlay=meta["pretrained_cfg"])

`num_classes=0` instead gives the pooled-feature backbone (timm drops the head).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lbgen.data.transforms import ImageTransform
from lbgen.errors import BackboneError  # noqa: F401  (raised here; defined with the others)
from lbgen.runtime.outputs import umask_mode
from lbgen.runtime.seeds import derive_seed

WEIGHTS_FILE = "backbone.safetensors"
META_FILE = "model.json"
# Keys of model.json that evaluation reads.
META_KEYS = frozenset({"model", "num_classes", "image_size", "mean", "std", "crop_pct", "pretrained_cfg"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A feature extractor (timm model, head removed) and the preprocessing it was trained with."""

    name: str  # how results tables show it
    model: torch.nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float

    def eval_transform(self, size: int | None = None) -> ImageTransform:
        """The evaluation transform of its images: its own input size and crop unless `size` is set."""
        return ImageTransform(size or self.image_size, train=False, crop_pct=self.crop_pct)


def pretrained_cfg_overlay(weights: Path, num_classes: int, image_size: int, mean, std, crop_pct: float) -> dict:
    """The overlay that makes `timm.create_model(..., pretrained=True)` load `weights`."""
    return {
        "file": str(weights),
        "num_classes": num_classes,
        "input_size": [3, image_size, image_size],
        "mean": list(mean),
        "std": list(std),
        "crop_pct": crop_pct,
    }


def export_backbone(model: torch.nn.Module, directory: Path, *, timm_name: str, class_ids, class_names,
                    image_size: int, mean, std, crop_pct: float, extra: dict | None = None) -> Path:
    """Write `backbone.safetensors` + `model.json` for `model` into `directory`; returns `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, weights, metadata={"format": "pt", "timm_model": timm_name})
    umask_mode(weights)
    meta = {
        "model": timm_name,
        "num_classes": len(class_ids),
        "classes": [{"class_id": i, "class_name": n} for i, n in zip(class_ids, class_names)],
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "crop_pct": crop_pct,
        "pretrained_cfg": pretrained_cfg_overlay(weights.resolve(), len(class_ids), image_size, mean, std, crop_pct),
        **(extra or {}),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


WHAT_A_BACKBONE_IS = (f"a backbone is a `lbgen pretrain` output: its directory, its {META_FILE} or its {WEIGHTS_FILE}; "
                      "or random:<timm name>, or timm:<timm name>")


def _meta_file(path: Path) -> Path:
    """The `model.json` a backbone argument names: the export directory's, itself, or the one beside a weights file."""
    if path.is_dir():
        return path / META_FILE
    if path.suffix == ".safetensors":
        return path.parent / META_FILE
    return path


def read_meta(path: Path) -> tuple[dict, Path]:
    """`model.json` of an export (its dir, itself or its weights file) and its weights file, looked up beside it."""
    path = Path(path)
    meta_file = _meta_file(path)
    if not meta_file.is_file():
        raise BackboneError(f"backbone {path}: no {META_FILE} there; {WHAT_A_BACKBONE_IS}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BackboneError(f"backbone {meta_file}: not valid JSON ({str(err)[:120]}); {WHAT_A_BACKBONE_IS}") from None
    missing = sorted(META_KEYS - set(meta)) if isinstance(meta, dict) else ["(not a JSON object)"]
    if missing:
        raise BackboneError(f"backbone {meta_file}: not a `lbgen pretrain` model.json (lacks {', '.join(missing)})")
    weights = meta_file.parent / WEIGHTS_FILE
    if not weights.is_file():
        raise BackboneError(f"backbone {meta_file.parent}: {WEIGHTS_FILE} missing")
    check_safetensors(weights)
    return meta, weights


def check_safetensors(path: Path) -> None:
    """Refuse a weights file that is not safetensors (e.g. a pickle under that name): nothing in it runs."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001  safetensors raises its own error types for a bad header
        raise BackboneError(f"backbone weights {path}: not a safetensors file ({str(err).splitlines()[0][:200]})") from None


def load_exported(path: Path, num_classes: int | None = None) -> torch.nn.Module:
    """The exported timm model; `num_classes=None` keeps its classifier, 0 removes it."""
    import timm

    meta, weights = read_meta(path)
    overlay = dict(meta["pretrained_cfg"], file=str(weights))  # the dir may have moved since export
    n = meta["num_classes"] if num_classes is None else num_classes
    return timm.create_model(meta["model"], pretrained=True, num_classes=n, pretrained_cfg_overlay=overlay)


def _from_export(spec: str, seed: int, num_classes: int | None) -> Backbone:
    meta, _ = read_meta(Path(spec))
    model = load_exported(Path(spec), num_classes=num_classes)
    return Backbone(spec, model, meta["image_size"], tuple(meta["mean"]), tuple(meta["std"]), meta["crop_pct"])


def _random(spec: str, seed: int, num_classes: int | None) -> Backbone:
    """`random:<timm name>`: random initialisation, seeded: the no-pre-training baseline."""
    import timm

    name = spec.split(":", 1)[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "random-backbone", name))
        model = _create(timm, name, pretrained=False, num_classes=num_classes)
    return Backbone(spec, model, 224, IMAGENET_MEAN, IMAGENET_STD, 0.875)


def _timm(spec: str, seed: int, num_classes: int | None) -> Backbone:
    """`timm:<name>`: timm's own pretrained weights (hub or cache), e.g. published real-ImageNet weights."""
    import timm

    model = _create(timm, spec.split(":", 1)[1], pretrained=True, num_classes=num_classes)
    cfg = model.pretrained_cfg
    return Backbone(spec, model, cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("crop_pct", 0.875))


def _create(timm, name: str, pretrained: bool, num_classes: int | None) -> torch.nn.Module:
    if not timm.is_model(name):
        raise BackboneError(f"unknown timm model {name!r}")
    head = {} if num_classes is None else {"num_classes": num_classes}  # None: the model's own classifier
    return timm.create_model(name, pretrained=pretrained, **head)


# Spec prefix -> loader; anything without a known prefix is a `lbgen pretrain` export.
LOADERS = {"random": _random, "timm": _timm}


def load_backbone(spec: str, seed: int = 0, classifier: bool = False) -> Backbone:
    """A backbone from `spec`: an export (dir, model.json or weights file), `random:<timm name>` or `timm:<timm name>`.

    Without `classifier` its head is removed (pooled features out); with it, the model keeps the
    classifier it was trained with (logits over `backbone_classes(spec)`).
    """
    prefix = spec.split(":", 1)[0] if ":" in spec else None
    loader = LOADERS.get(prefix, _from_export)
    return loader(spec, seed, None if classifier else 0)


def backbone_classes(spec: str) -> list[str]:
    """The class ids of `spec`'s classifier outputs, in output order, read without loading weights.

    An export's come from its model.json; `timm:NAME` weights with 1000 outputs are ImageNet-1k's, in
    the order of the shipped `imagenet1k` table (WordNet ids, the order of timm's and torchvision's heads).
    """
    prefix = spec.split(":", 1)[0] if ":" in spec else None
    if prefix is None:
        meta, _ = read_meta(Path(spec))
        return [str(c["class_id"]) for c in meta.get("classes", [])]
    if prefix == "timm":
        import timm

        name = spec.split(":", 1)[1]
        if not timm.is_model(name):
            raise BackboneError(f"unknown timm model {name!r}")
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
        outputs = pretrained_cfg.num_classes if pretrained_cfg else None
        if outputs == 1000:
            from lbgen.data.classes import load_class_table

            return list(load_class_table("imagenet1k").ids)
        raise BackboneError(f"backbone {spec}: its {outputs} outputs are not ImageNet-1k's 1000; no class ids are known for them")
    raise BackboneError(f"backbone {spec}: a random initialisation has no classifier to apply; "
                        f"give a `lbgen pretrain` export or timm:<name>")
