"""The run report: `report.html` (self-contained) and `report.md` (+ `report_files/`) for a run directory.

`build_report(DIR)` reads what the stages wrote under DIR (`finetune/`, `generate/`, `pretrain/`,
`evaluate/`): fine-tuning curves and per-class samples before and after, the dataset's score
histograms, per-class CLIP agreement and diversity, the pre-training curve, the transfer table and
plot. A stage not run yet gets a note; an unreadable input is a `ReportError` naming the file.

The report is composed once, as Markdown (the small subset `markdown_to_html` converts), with every
figure named `report_files/NAME.png`: `report.md` links the files, `report.html` embeds them as
data URIs, so the two always say the same.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lbgen.config import Config, ConfigError, ReportConfig, from_dict, load_yaml
from lbgen.data.dataset import DATA_DIR, read_manifest, read_stats, summarize
from lbgen.errors import ReportError  # noqa: F401  (raised here; defined with the others)

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FILES_DIR = "report_files"
# Per-class charts draw one bar per class up to this many classes, a histogram over classes beyond.
MAX_BAR_CLASSES = 40
# The per-class table lists every class up to this many, else this many of the least diverse.
MAX_TABLE_CLASSES = 30
# Images per CLIP forward when embedding for the diversity measure.
EMBED_BATCH = 64

FINETUNE_PANELS = {
    "losses": ("loss", "loss_in", "loss_en", "loss_q", "loss_d"),
    "CLIP cosine and quality": ("clip_cos", "iqa_score"),
    "discriminator accuracy": ("d_acc_real", "d_acc_fake"),
}
PRETRAIN_PANELS = {"loss": ("train_loss", "val_loss"), "validation accuracy": ("val_acc",), "learning rate": ("lr",)}


# ---------------------------------------------------------------- composing


@dataclass
class Report:
    """Markdown blocks plus the PNG bytes of the figures they link (`report_files/NAME.png`)."""

    blocks: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def add(self, *blocks: str) -> None:
        self.blocks.extend(blocks)

    def table(self, header: list[str], rows: list[list], right: set[int] = frozenset()) -> None:
        """A pipe table; columns whose index is in `right` are right-aligned (numbers)."""
        align = "|" + "".join("---:|" if i in right else "---|" for i in range(len(header)))
        lines = ["| " + " | ".join(header) + " |", align] + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.add("\n".join(lines))

    def image(self, name: str, png: bytes, caption: str) -> None:
        self.figures[name] = png
        self.add(f"![{caption}]({FILES_DIR}/{name})")

    def plot(self, name: str, fig, caption: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        self.image(name, buffer.getvalue(), caption)

    def markdown(self) -> str:
        return "\n\n".join(self.blocks) + "\n"


def new_figure(panels: int, width: float = 4.2, height: float = 3.2):
    """A matplotlib Figure (no pyplot: no global state, no display) with `panels` axes in a row."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), layout="constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def not_run(report: Report, what: str) -> None:
    report.add(f"Not run yet (no `{what}`).")


# ---------------------------------------------------------------- reading inputs


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a metrics log; a last line without its newline is still being written."""
    text = read_text(path)
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ReportError(f"{path}: line {number} is not JSON ({err})") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot be read ({err})") from None


def read_image(path: Path) -> Image.Image:
    from lbgen.data.transforms import decode_image

    try:
        return decode_image(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: not a readable image ({err})") from None


def stage_config(directory: Path) -> Config:
    """The resolved config a stage saved beside its outputs."""
    path = directory / "config.yaml"
    if not path.exists():
        raise ReportError(f"{path}: missing (every stage writes its config there)")
    try:
        return from_dict(Config, load_yaml(path), str(path))
    except ConfigError as err:
        raise ReportError(str(err)) from None


def plot_series(ax, records: list[dict], x_key: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        points = [(r[x_key], r[key]) for r in records if isinstance(r.get(key), (int, float)) and x_key in r]
        if points:
            ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
    ax.set_xlabel(x_key)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


# ---------------------------------------------------------------- sections


def status_section(report: Report, run_dir: Path) -> None:
    from lbgen.stages.run import STAGES, stage_complete

    report.add("## Stages")
    rows = []
    for stage in STAGES:
        directory = run_dir / stage
        state = "complete" if stage_complete(stage, directory) else "incomplete (running or stopped)" if directory.is_dir() else "not run yet"
        rows.append([stage, state, f"`{stage}/`"])
    report.table(["stage", "state", "directory"], rows)


def finetune_section(report: Report, directory: Path) -> None:
    report.add("## Fine-tuning")
    metrics = directory / "metrics.jsonl"
    if not metrics.exists():
        return not_run(report, "finetune/metrics.jsonl")
    records = read_jsonl(metrics)
    steps = [r for r in records if "step" in r]
    warmup = [r for r in records if r.get("phase") == "warmup"]
    if warmup:
        w = warmup[-1]
        report.add(f"Discriminator warm-up: accuracy on real text {fmt(w.get('d_acc_real'))}, "
                   f"on generated images {fmt(w.get('d_acc_fake'))} (loss {fmt(w.get('loss_d'))}); "
                   "shown at step 0 in the curves.")
    if steps:
        last = steps[-1]
        report.add(f"{len(steps)} steps logged. Last step ({last['step']}): "
                   + ", ".join(f"{k} {fmt(last.get(k))}" for keys in FINETUNE_PANELS.values() for k in keys) + ".")
        fig, axes = new_figure(len(FINETUNE_PANELS))
        curve = [{**r, "step": 0} for r in warmup[-1:]] + steps
        for ax, (title, keys) in zip(axes, FINETUNE_PANELS.items()):
            plot_series(ax, curve, "step", keys)
            ax.set_title(title)
        report.plot("finetune_curves.png", fig, "Fine-tuning: losses, CLIP cosine and quality, discriminator accuracy per step")
    else:
        report.add("No training step logged yet.")
    samples_section(report, directory)


def grid_tiles(grid: Image.Image, count: int, path: Path) -> list[Image.Image]:
    """Cut a sample grid (finetune's `save_grid` of `count` images) back into its tiles, in label order."""
    from lbgen.stages.finetune import GRID_COLUMNS, GRID_PADDING

    columns = min(GRID_COLUMNS, count)
    rows = math.ceil(count / columns)
    width, rest_w = divmod(grid.width - GRID_PADDING, columns)
    height, rest_h = divmod(grid.height - GRID_PADDING, rows)
    if rest_w or rest_h or width <= GRID_PADDING or height <= GRID_PADDING:
        raise ReportError(f"{path}: {grid.width}x{grid.height} px is not a grid of {count} samples in {columns} columns")
    boxes = [(c * width + GRID_PADDING, r * height + GRID_PADDING) for r, c in (divmod(i, columns) for i in range(count))]
    return [grid.crop((x, y, x + width - GRID_PADDING, y + height - GRID_PADDING)) for x, y in boxes]


def samples_section(report: Report, directory: Path) -> None:
    """Per class, the sample from the first grid (before fine-tuning) beside the one from the last."""
    from matplotlib.figure import Figure

    from lbgen.data.classes import load_class_table

    report.add("### Samples per class, before and after fine-tuning")
    grids = sorted((directory / "samples").glob("step-*.png"))
    if not grids:
        return not_run(report, "finetune/samples/step-*.png")
    cfg = stage_config(directory)
    names = load_class_table(cfg.classes).names
    count = min(cfg.finetune.sample_classes, len(names))
    first, last = grids[0], grids[-1]
    columns = [(first, grid_tiles(read_image(first), count, first)), (last, grid_tiles(read_image(last), count, last))]
    per_row = min(4, count)  # classes per figure row; each class takes a before and an after panel
    rows = math.ceil(count / per_row)
    fig = Figure(figsize=(1.5 * 2 * per_row, 1.9 * rows), layout="constrained")
    axes = fig.subplots(rows, 2 * per_row, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for label in range(count):
        r, c = divmod(label, per_row)
        for side, (path, tiles) in enumerate(columns):
            ax = axes[r][2 * c + side]
            ax.imshow(tiles[label])
            step = int(path.stem.split("-")[1])
            ax.set_title(f"{textwrap.shorten(names[label], 22)}\nstep {step}", fontsize=8)
    report.add(f"One image per class from a fixed seed: left `{first.name}`, right `{last.name}`"
               f" ({len(grids)} grids in `finetune/samples/`).")
    report.plot("finetune_samples.png", fig, "Samples per class before (left) and after (right) fine-tuning")


def dataset_section(report: Report, directory: Path, cfg: ReportConfig) -> None:
    report.add("## Generated dataset")
    manifest = read_manifest(directory)
    if manifest is None:
        return not_run(report, "generate/manifest.json")
    shards = [directory / DATA_DIR / name for name in sorted(manifest.get("shards", {}))]
    if not shards:
        return report.add("Started; no shard finished yet.")
    names = list(manifest["label_names"])
    stats = pa.concat_tables(shard_stats(path) for path in shards)
    summary = summarize(stats, names)
    report.add(f"{summary['rows']} images in {len(shards)} of {manifest['num_shards']} shards, {len(names)} classes; "
               f"generator `{manifest.get('generator')}`. Mean CLIP score {fmt(summary['clip_score_mean'])}, "
               f"mean quality {fmt(summary['iqa_score_mean'])}, CLIP zero-shot agreement {fmt(summary['clip_agreement'])}.")

    fig, axes = new_figure(2)
    for ax, column, title in zip(axes, ("clip_score", "iqa_score"), ("CLIP score (image vs. own class)", "quality score")):
        ax.hist(stats.column(column).to_numpy(), bins=30)
        ax.locator_params(axis="x", nbins=5)  # few ticks: score values have many digits
        ax.set_title(title)
        ax.set_ylabel("images")
    report.plot("dataset_scores.png", fig, "Histograms of the CLIP and quality scores")

    labels = stats.column("label").to_numpy()
    counts = np.bincount(labels, minlength=len(names))
    per_class = summary["per_class_agreement"]  # by name: label_names are unique
    gen_cfg = stage_config(directory)
    diversity = on_a_gpu_if_any(dataset_diversity, shards, labels, gen_cfg, cfg.diversity_images)
    present = [i for i in range(len(names)) if counts[i]]
    agreement = {i: per_class[names[i]] for i in present}
    per_class_figure(report, "dataset_agreement.png", names, agreement,
                     "CLIP zero-shot agreement", "Per-class CLIP zero-shot agreement (share of images CLIP assigns to their own class)")
    per_class_figure(report, "dataset_diversity.png", names, diversity, "diversity (mean CLIP cosine distance)",
                     f"Per-class diversity: mean pairwise CLIP cosine distance between images of a class "
                     f"(a seeded choice of at most {cfg.diversity_images} per class, CLIP `{gen_cfg.model.clip}`)")
    shown = sorted(present, key=lambda i: (diversity.get(i, math.inf), i))[:MAX_TABLE_CLASSES] if len(present) > MAX_TABLE_CLASSES else present
    if len(shown) < len(present):
        report.add(f"The {len(shown)} least diverse of {len(present)} classes:")
    report.table(["label", "class", "images", "CLIP agreement", "diversity"],
                 [[i, names[i], int(counts[i]), f"{agreement[i]:.2f}", fmt(diversity.get(i))] for i in shown], right={0, 2, 3, 4})


def shard_stats(path: Path) -> pa.Table:
    try:
        return read_stats([path])
    except (OSError, pa.ArrowException) as err:
        raise ReportError(f"{path}: unreadable Parquet shard ({err})") from None


def per_class_figure(report: Report, name: str, names: list[str], values: dict[int, float], xlabel: str, caption: str) -> None:
    """One bar per class when there are few, else a histogram over classes."""
    if not values:
        return report.add(f"{caption}: no class has enough images.")
    fig, (ax,) = new_figure(1, width=7, height=max(2.5, 0.22 * len(values)) if len(values) <= MAX_BAR_CLASSES else 3.2)
    labels = sorted(values)
    if len(labels) <= MAX_BAR_CLASSES:
        ax.barh([textwrap.shorten(names[i], 28) for i in labels], [values[i] for i in labels])
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel(xlabel)
    else:
        ax.hist([values[i] for i in labels], bins=30)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("classes")
    ax.grid(alpha=0.3, axis="x")
    report.plot(name, fig, caption)


# ---------------------------------------------------------------- diversity


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean cosine distance (1 - cos) over the distinct pairs of rows of (n, d) `features`, n >= 2."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = unit @ unit.T
    n = len(unit)
    return float(max(0.0, 1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1))))


def choose_rows(labels: np.ndarray, per_class: int, seed: int) -> dict[int, np.ndarray]:
    """label -> sorted positions (into `labels`) of at most `per_class` rows, a seeded choice per class.

    Each class draws from its own seed, so a class's choice does not depend on the other classes.
    """
    from lbgen.runtime.seeds import derive_seed

    chosen = {}
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rng = np.random.default_rng(derive_seed(seed, "report-diversity", int(label)))
        chosen[int(label)] = np.sort(rng.choice(rows, size=min(per_class, len(rows)), replace=False))
    return chosen


def read_images(shards: list[Path], positions: np.ndarray) -> list[bytes]:
    """Image bytes at the sorted global row `positions` of `shards` taken in order."""
    out = []
    start = 0
    for path in shards:
        try:
            file = pq.ParquetFile(path)
            rows = file.metadata.num_rows
            out += shard_images(file, positions[(positions >= start) & (positions < start + rows)] - start)
        except (OSError, pa.ArrowException) as err:
            raise ReportError(f"{path}: unreadable Parquet shard ({err})") from None
        start += rows
    return out


def shard_images(file: pq.ParquetFile, rows: np.ndarray) -> list[bytes]:
    """Image bytes at the sorted `rows` of one shard, reading only the row groups that hold them."""
    group_starts = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
    group_of = np.searchsorted(group_starts, rows, side="right") - 1
    groups = np.unique(group_of)
    if not len(groups):
        return []
    images = file.read_row_groups(groups.tolist(), columns=["image"]).column("image")
    # In the table read, a group's rows follow those of the groups read before it.
    read_before = np.cumsum([0] + [group_starts[g + 1] - group_starts[g] for g in groups])[:-1]
    at = read_before[np.searchsorted(groups, group_of)] + rows - group_starts[group_of]
    return [images[int(i)]["bytes"].as_py() for i in at]


def dataset_diversity(shards: list[Path], labels: np.ndarray, cfg: Config, per_class: int) -> dict[int, float]:
    """label -> mean pairwise CLIP cosine distance of at most `per_class` images of that class.

    `labels` are the shards' labels in order; the CLIP model is the run's (`cfg.model`), on a GPU
    when there is one. Classes with fewer than two images have no value.
    """
    import torch

    from lbgen.data.transforms import decode_pixels
    from lbgen.models.clip import create_clip

    chosen = {label: rows for label, rows in choose_rows(labels, per_class, cfg.seed).items() if len(rows) >= 2}
    if not chosen:
        return {}
    positions = np.sort(np.concatenate(list(chosen.values())))
    images = dict(zip(positions.tolist(), read_images(shards, positions)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = create_clip(cfg.model.clip, cfg.model.clip_pretrained, device=device, seed=cfg.seed)
    features = {}
    with torch.no_grad():
        for i in range(0, len(positions), EMBED_BATCH):
            batch = positions[i : i + EMBED_BATCH].tolist()
            pixels = torch.stack([decode_pixels(images[p]) for p in batch])
            encoded = clip.encode_image(pixels.to(device).float() / 255).cpu().numpy()
            features.update(zip(batch, encoded))
    return {label: mean_pairwise_distance(np.stack([features[p] for p in rows.tolist()])) for label, rows in chosen.items()}


def on_a_gpu_if_any(fn: Callable, *args, num_gpus: float | None = None):
    """`fn(*args)` in a Ray task holding `num_gpus` GPUs; by default one when the attached Ray
    cluster has GPUs (a cluster's driver often has none: CLIP ViT-L on CPU takes seconds per
    image), else `fn(*args)` right here."""
    from lbgen.runtime.training import use_gpu

    if num_gpus is None:
        num_gpus = 1 if use_gpu(None) else 0
        if not num_gpus:
            return fn(*args)
    import ray

    return ray.get(ray.remote(num_gpus=num_gpus)(fn).remote(*args))


def pretrain_section(report: Report, directory: Path) -> None:
    report.add("## Pre-training")
    metrics = directory / "metrics.jsonl"
    if not metrics.exists():
        return not_run(report, "pretrain/metrics.jsonl")
    epochs = [r for r in read_jsonl(metrics) if "epoch" in r]
    if not epochs:
        return report.add("No epoch finished yet.")
    last = epochs[-1]
    report.add(f"{len(epochs)} epochs. Last epoch: train loss {fmt(last.get('train_loss'))}, "
               f"validation loss {fmt(last.get('val_loss'))}, validation accuracy {fmt(last.get('val_acc'))} "
               f"on {last.get('val_images', 'n/a')} held-out generated images.")
    fig, axes = new_figure(len(PRETRAIN_PANELS))
    for ax, (title, keys) in zip(axes, PRETRAIN_PANELS.items()):
        plot_series(ax, epochs, "epoch", keys)
        ax.set_title(title)
    report.plot("pretrain_curves.png", fig, "Pre-training on the generated dataset, per epoch")


def evaluate_section(report: Report, directory: Path) -> None:
    report.add("## Transfer")
    results = directory / "results.md"
    if not results.exists():
        return not_run(report, "evaluate/results.md")
    # results.md's own headings sit under this section.
    report.add(re.sub(r"^#", "###", read_text(results).strip(), flags=re.MULTILINE))
    plot = directory / "accuracy_vs_fraction.png"
    if plot.exists():
        read_image(plot)  # a damaged plot is an error naming it, not a broken image in the page
        report.image("accuracy_vs_fraction.png", plot.read_bytes(), "Accuracy vs. fraction of downstream training data")


# ---------------------------------------------------------------- rendering


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f3f3f3; }
figure { margin: 1em 0; }
img { max-width: 100%; }
figcaption { font-size: .85em; color: #555; }
code { background: #f3f3f3; padding: 0 .2em; }
"""

IMAGE_LINE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")


def inline_html(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


def table_html(lines: list[str]) -> str:
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    header, align, body = cells(lines[0]), cells(lines[1]), [cells(line) for line in lines[2:]]
    style = [' style="text-align:right"' if a.endswith(":") and not a.startswith(":") else "" for a in align]
    row = lambda tag, values: "<tr>" + "".join(f"<{tag}{s}>{inline_html(v)}</{tag}>" for v, s in zip(values, style)) + "</tr>"
    return "<table>\n" + row("th", header) + "\n" + "\n".join(row("td", r) for r in body) + "\n</table>"


def markdown_to_html(text: str, image_src: Callable[[str], str], title: str) -> str:
    """The Markdown subset the report writes (headings, paragraphs, pipe tables, image lines) as one HTML page."""
    parts = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.strip().splitlines()
        heading = re.match(r"^(#{1,6})\s+(.*)$", lines[0])
        if heading and len(lines) == 1:
            level = len(heading.group(1))
            parts.append(f"<h{level}>{inline_html(heading.group(2))}</h{level}>")
        elif len(lines) >= 2 and all(line.lstrip().startswith("|") for line in lines):
            parts.append(table_html(lines))
        elif all(IMAGE_LINE.match(line) for line in lines):
            for line in lines:
                m = IMAGE_LINE.match(line)
                alt = html.escape(m["alt"])
                parts.append(f'<figure><img src="{image_src(m["src"])}" alt="{alt}"><figcaption>{alt}</figcaption></figure>')
        else:
            parts.append("<p>" + inline_html(" ".join(lines)) + "</p>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def compose(run_dir: Path, cfg: ReportConfig) -> Report:
    report = Report()
    report.add("# lbgen run report", f"Run directory: `{run_dir}`")
    status_section(report, run_dir)
    finetune_section(report, run_dir / "finetune")
    dataset_section(report, run_dir / "generate", cfg)
    pretrain_section(report, run_dir / "pretrain")
    evaluate_section(report, run_dir / "evaluate")
    return report


def build_report(run_dir: str | Path, cfg: ReportConfig | None = None) -> dict[str, Path]:
    """Write `report.md` (+ `report_files/*.png`) and the self-contained `report.html` into `run_dir`.

    Args:
        run_dir: a directory written by `lbgen run` (stages not run yet get a note).
        cfg: report settings (default: `ReportConfig()`).
    Returns:
        {"html": ..., "markdown": ..., "files": ...} paths.
    Raises:
        ReportError: `run_dir` is not a directory, or one of its inputs cannot be read (named).
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory (expected the --output of `lbgen run`)")
    report = compose(run_dir, cfg or ReportConfig())
    files = run_dir / FILES_DIR
    files.mkdir(exist_ok=True)
    for stale in files.glob("*.png"):
        if stale.name not in report.figures:
            stale.unlink()
    for name, png in report.figures.items():
        (files / name).write_bytes(png)
    text = report.markdown()
    (run_dir / REPORT_MD).write_text(text, encoding="utf-8")

    def data_uri(src: str) -> str:
        return "data:image/png;base64," + base64.b64encode(report.figures[src.removeprefix(f"{FILES_DIR}/")]).decode()

    (run_dir / REPORT_HTML).write_text(markdown_to_html(text, data_uri, f"lbgen run report: {run_dir.name}"), encoding="utf-8")
    return {"html": run_dir / REPORT_HTML, "markdown": run_dir / REPORT_MD, "files": files}
