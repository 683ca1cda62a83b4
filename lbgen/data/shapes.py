"""Procedural downstream sets: a seeded shapes dataset drawn with PIL, so evaluation runs without downloads.

Kind `shapes` (10 classes: 5 shapes x filled/outline) is an ImageFolder with a shift between
train/ (flat noisy backgrounds) and test/ (striped backgrounds, other sizes). Kind `shapes-in9`
writes ImageNet-9-style folders (original/, mixed_same/, mixed_rand/) where the background colour
goes with the class in original/ and mixed_same/ but is drawn at random in mixed_rand/: a model
that leans on backgrounds shows a gap. `render_shape` is the one drawing function (tests also make
shards with it). `KINDS` writes each of the kinds `make_downstream.kind` accepts (`lbgen.config.choices`).
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lbgen.errors import DownstreamError
from lbgen.runtime.seeds import derive_seed

SHAPES = ("circle", "square", "triangle", "cross", "star")
STYLES = ("filled", "outline")
SHAPE_CLASSES = tuple(f"{style} {shape}" for shape in SHAPES for style in STYLES)


# ---------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        radii = [r] * 4
    elif shape == "triangle":
        corners = [(-math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
        radii = [r] * 3
    elif shape == "star":
        corners = [(-math.pi / 2 + k * math.pi / 5) for k in range(10)]
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    elif shape == "cross":
        a = 0.33  # arm half-width relative to r
        pts = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]
        return [(cx + r * (x * math.cos(angle) - y * math.sin(angle)), cy + r * (x * math.sin(angle) + y * math.cos(angle))) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + rad * math.cos(c + angle), cy + rad * math.sin(c + angle)) for c, rad in zip(corners, radii)]


def _background(rng: np.random.Generator, size: int, hue: float | None, striped: bool) -> np.ndarray:
    """(size, size, 3) float in [0, 1]: a flat colour (random, or of `hue`) with noise, optionally striped."""
    hue = rng.random() if hue is None else (hue + rng.normal(0, 0.02)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 0.8), rng.uniform(0.35, 0.9)))
    image = np.broadcast_to(base, (size, size, 3)).copy()
    if striped:
        period = rng.uniform(size / 8, size / 3)
        theta = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:size, 0:size]
        wave = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)
        image *= (0.88 + 0.12 * wave)[..., None]
    image += rng.normal(0, 0.06, image.shape)
    return np.clip(image, 0, 1)


def render_shape(label: int, rng: np.random.Generator, size: int, *, bg_hue: float | None = None,
                 striped: bool = False, scale: tuple[float, float] = (0.25, 0.42)) -> Image.Image:
    """An RGB image of class `label` of SHAPE_CLASSES: the shape, style, random pose and colours.

    `bg_hue` fixes the background's hue (None: random), `striped` adds a stripe texture,
    `scale` is the shape's radius range as a share of the side.
    """
    shape, style = SHAPES[label // len(STYLES)], STYLES[label % len(STYLES)]
    background = _background(rng, size, bg_hue, striped)
    factor = 4  # draw large and downsample: anti-aliased edges
    big = size * factor
    canvas = Image.fromarray((background * 255).astype(np.uint8)).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    r = rng.uniform(*scale) * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    angle = rng.uniform(-0.35, 0.35)
    # Foreground contrasts with the background's brightness.
    value = 0.15 if background.mean() > 0.5 else 0.95
    fill = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.9), value))
    width = max(1, int(r * 0.22))
    if shape == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=fill) if style == "filled" else draw.ellipse(box, outline=fill, width=width)
    else:
        points = _polygon(shape, cx, cy, r, angle)
        if style == "filled":
            draw.polygon(points, fill=fill)
        else:
            draw.line(points + points[:1], fill=fill, width=width, joint="curve")
    return canvas.resize((size, size), Image.LANCZOS)


# ---------------------------------------------------------------- writing


def _class_dir(label: int) -> str:
    return f"{label:02d}_{SHAPE_CLASSES[label].replace(' ', '_')}"


def _write_split(root: Path, per_class: int, size: int, seed: int, name: str, **style) -> None:
    for label in range(len(SHAPE_CLASSES)):
        folder = root / _class_dir(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng(derive_seed(seed, "downstream", name, label, i))
            bg = style.get("bg_hue")
            kwargs = dict(style, bg_hue=bg(label, rng) if callable(bg) else bg)
            render_shape(label, rng, size, **kwargs).save(folder / f"{i:05d}.png")


def _class_hue(label: int) -> float:
    return label / len(SHAPE_CLASSES)


def _own_background(label: int, rng: np.random.Generator) -> float:
    """Hue of the class's own background (original/, mixed_same/)."""
    return _class_hue(label)


def _random_background(label: int, rng: np.random.Generator) -> float:
    """Hue of a random class's background (mixed_rand/)."""
    return _class_hue(int(rng.integers(len(SHAPE_CLASSES))))


def _write_shapes(output: Path, train_per_class: int, test_per_class: int, size: int, seed: int) -> None:
    """ImageFolder train/ (flat noisy backgrounds) and test/ (the shift: striped backgrounds, smaller shapes)."""
    _write_split(output / "train", train_per_class, size, seed, "train", striped=False, scale=(0.25, 0.42))
    _write_split(output / "test", test_per_class, size, seed, "test", striped=True, scale=(0.22, 0.38))


def _write_shapes_in9(output: Path, train_per_class: int, test_per_class: int, size: int, seed: int) -> None:
    """ImageNet-9-style original/ (train + val), mixed_same/ and mixed_rand/ (val)."""
    same, rand = _own_background, _random_background
    _write_split(output / "original" / "train", train_per_class, size, seed, "in9-train", bg_hue=same)
    _write_split(output / "original" / "val", test_per_class, size, seed, "in9-original", bg_hue=same)
    _write_split(output / "mixed_same" / "val", test_per_class, size, seed, "in9-same", bg_hue=same)
    _write_split(output / "mixed_rand" / "val", test_per_class, size, seed, "in9-rand", bg_hue=rand)


# `make_downstream.kind` -> its writer: one per name of `lbgen.config.choices.DOWNSTREAM_KINDS`.
def _write_fashion_mnist(output: Path, train_per_class: int, test_per_class: int, size: int, seed: int) -> None:
    """Real Fashion-MNIST (not procedural): ImageFolder train/ + test/ keyed by class id (`lbgen.data.fashion_mnist`)."""
    from lbgen.data.fashion_mnist import write_fashion_mnist

    write_fashion_mnist(output, train_per_class, test_per_class, size, seed)


KINDS = {"shapes": _write_shapes, "shapes-in9": _write_shapes_in9, "fashion-mnist": _write_fashion_mnist}


def make_downstream(kind: str, output: str | Path, *, train_per_class: int, test_per_class: int, size: int, seed: int = 0) -> Path:
    """Write the procedural dataset `kind` (a key of `KINDS`) under `output`; returns it."""
    if kind not in KINDS:
        raise DownstreamError(f"unknown downstream kind {kind!r}; known: {', '.join(KINDS)}")
    output = Path(output)
    KINDS[kind](output, train_per_class, test_per_class, size, seed)
    return output
