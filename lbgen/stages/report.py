"""The run report: `report.html` (self-contained) and `report.md` (+ `report_files/`) for a run directory.

`build_report(DIR)` reads what the stages wrote under DIR (`finetune/`, `generate/`, `pretrain/`,
`evaluate/`): fine-tuning curves and per-class samples before and after (finetune's per-class
tiles), the dataset's score histograms, per-class CLIP agreement and diversity, the pre-training
curve, the transfer table (from evaluate's `results.json` records) and plot. The stages, their order
and their sections come from the stage registry (`lbgen.stages`). A stage not run yet gets a note;
an unreadable input is a `ReportError` naming the file.

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
from PIL import Image

from lbgen.config import Config, ConfigError, ReportConfig, from_dict, load_yaml
from lbgen.data.reader import class_similarity, finished_shards, read_manifest, read_stats, summarize
from lbgen.errors import ReportError  # noqa: F401  (raised here; defined with the others)
from lbgen.stages import resolve_ref, run_steps

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FILES_DIR = "report_files"
# Per-class charts draw one bar per class up to this many classes, a histogram over classes beyond.
MAX_BAR_CLASSES = 40
# The per-class table lists every class up to this many, else this many of the least diverse.
MAX_TABLE_CLASSES = 30

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
    report.add("## Stages")
    rows = []
    for step in run_steps():
        directory = run_dir / step.directory
        state = "complete" if step.is_complete(directory) else "incomplete (running or stopped)" if directory.is_dir() else "not run yet"
        rows.append([step.directory, state, f"`{step.directory}/`"])
    report.table(["stage", "state", "directory"], rows)


def finetune_section(report: Report, directory: Path, cfg: ReportConfig) -> None:
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


def samples_section(report: Report, directory: Path) -> None:
    """Per class, its sample tile from the first sampled step (before fine-tuning) beside the one from the last."""
    from matplotlib.figure import Figure

    from lbgen.data.classes import load_class_table
    from lbgen.stages.finetune import sample_tile

    report.add("### Samples per class, before and after fine-tuning")
    steps = sorted(p for p in (directory / "samples").glob("step-*") if p.is_dir())
    if not steps:
        return not_run(report, "finetune/samples/step-*/")
    cfg = stage_config(directory)
    table = load_class_table(cfg.classes)
    count = min(cfg.finetune.sample_classes, len(table))
    first, last = steps[0], steps[-1]

    def tiles(step: Path) -> list[Image.Image]:
        paths = [sample_tile(step, class_id) for class_id in table.ids[:count]]
        missing = next((path for path in paths if not path.exists()), None)
        if missing:
            raise ReportError(f"{missing}: missing (finetune writes one sample per class, {count} classes)")
        return [read_image(path) for path in paths]

    columns = [(first, tiles(first)), (last, tiles(last))]
    per_row = min(4, count)  # classes per figure row; each class takes a before and an after panel
    rows = math.ceil(count / per_row)
    fig = Figure(figsize=(1.5 * 2 * per_row, 1.9 * rows), layout="constrained")
    axes = fig.subplots(rows, 2 * per_row, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for label in range(count):
        r, c = divmod(label, per_row)
        for side, (path, images) in enumerate(columns):
            ax = axes[r][2 * c + side]
            ax.imshow(images[label])
            step = int(path.name.split("-")[1])
            ax.set_title(f"{textwrap.shorten(table.names[label], 22)}\nstep {step}", fontsize=8)
    report.add(f"One image per class from a fixed seed: left `{first.name}/`, right `{last.name}/`"
               f" ({len(steps)} sampled steps in `finetune/samples/`).")
    report.plot("finetune_samples.png", fig, "Samples per class before (left) and after (right) fine-tuning")


def dataset_section(report: Report, directory: Path, cfg: ReportConfig) -> None:
    report.add("## Generated dataset")
    manifest = read_manifest(directory)
    if manifest is None:
        return not_run(report, "generate/manifest.json")
    shards = finished_shards(directory, manifest)
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

    counts = np.bincount(stats.column("label").to_numpy(), minlength=len(names))
    present = [i for i in range(len(names)) if counts[i]]
    agreement = {i: summary["per_class_agreement"][names[i]] for i in present}  # by name: label_names are unique
    similar = {found.label: found for found in class_similarity(shards, cfg.near_duplicate_cosine)}
    diversity = {i: found.diversity for i, found in similar.items() if found.diversity is not None}
    duplicated = {i: found.with_duplicate / found.images for i, found in similar.items()}
    clip = stage_config(directory).model.clip
    per_class_figure(report, "dataset_agreement.png", names, agreement,
                     "CLIP zero-shot agreement", "Per-class CLIP zero-shot agreement (share of images CLIP assigns to their own class)")
    per_class_figure(report, "dataset_diversity.png", names, diversity, "diversity (mean CLIP cosine distance)",
                     f"Per-class diversity: mean pairwise CLIP cosine distance between the images of a class "
                     f"(the embeddings `generate` stored, CLIP `{clip}`)")
    pairs = sum(len(found.pairs) for found in similar.values())
    report.add(f"Near-duplicates (CLIP cosine >= {cfg.near_duplicate_cosine} within a class): {pairs} pair(s); "
               f"{fmt(sum(f.with_duplicate for f in similar.values()) / max(1, len(stats)))} of the images have one.")
    shown = sorted(present, key=lambda i: (diversity.get(i, math.inf), i))[:MAX_TABLE_CLASSES] if len(present) > MAX_TABLE_CLASSES else present
    if len(shown) < len(present):
        report.add(f"The {len(shown)} least diverse of {len(present)} classes:")
    report.table(["label", "class", "images", "CLIP agreement", "diversity", "near-duplicate share"],
                 [[i, names[i], int(counts[i]), f"{agreement[i]:.2f}", fmt(diversity.get(i)), f"{duplicated[i]:.2f}"] for i in shown],
                 right={0, 2, 3, 4, 5})


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


def pretrain_section(report: Report, directory: Path, cfg: ReportConfig) -> None:
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


def evaluate_section(report: Report, directory: Path, cfg: ReportConfig) -> None:
    from lbgen.data.results import RESULTS_JSON, read_results, results_markdown

    report.add("## Transfer")
    path = directory / RESULTS_JSON
    if not path.exists():
        return not_run(report, f"evaluate/{RESULTS_JSON}")
    try:
        results = read_results(path)
    except ValueError as err:
        raise ReportError(str(err)) from None
    # Rendered from the records, its headings under this section's.
    report.add(results_markdown(results["results"], results["bias"], results["protocol"], level=3, classify=results["classify"]).strip())
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
    for step in run_steps():
        if step.report:
            resolve_ref(step.report)(report, run_dir / step.directory, cfg)
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
