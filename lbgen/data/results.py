"""The files `evaluate` writes and `report` reads: `results.json` (every record), its CSV and Markdown
tables and the accuracy-vs-fraction plot.

Records: transfer rows (`RESULT_FIELDS`, one per backbone x set x fraction), bias rows (`BIAS_FIELDS`)
and same-class rows of the `classify` protocol (`CLASSIFY_FIELDS` plus a `per_class` mapping).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

RESULT_FIELDS = ("backbone", "dataset", "protocol", "fraction", "train_images", "accuracy", "l2", "seconds")
BIAS_FIELDS = ("backbone", "dataset", "original", "mixed_same", "mixed_rand", "bg_gap")
CLASSIFY_FIELDS = ("backbone", "dataset", "images", "classes", "top1", "top5", "seconds")
PER_CLASS_FIELDS = ("backbone", "dataset", "class_id", "images", "top1")
RESULTS_JSON = "results.json"
# results.json's record lists and the fields each record must have.
SECTIONS = {"results": RESULT_FIELDS, "bias": BIAS_FIELDS, "classify": CLASSIFY_FIELDS}


def _fmt_fraction(f: float) -> str:
    return f"{f * 100:g}%"


def write_csv(rows: list[dict], path: Path, fields) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def per_class_rows(classify: list[dict]) -> list[dict]:
    """One row per (backbone, set, class) of the `classify` records."""
    return [{"backbone": r["backbone"], "dataset": r["dataset"], "class_id": c, **v}
            for r in classify for c, v in r["per_class"].items()]


def averages(rows: list[dict]) -> dict[str, dict[float, float]]:
    """backbone -> fraction -> mean accuracy over datasets."""
    table: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        table.setdefault(row["backbone"], {}).setdefault(row["fraction"], []).append(row["accuracy"])
    return {b: {f: float(np.mean(v)) for f, v in per.items()} for b, per in table.items()}


def write_results(rows: list[dict], bias_rows: list[dict], protocol: str, path: Path, classify: list[dict] = ()) -> None:
    """`results.json`: the protocol and the records of each section (`SECTIONS`)."""
    data = {"protocol": protocol, "results": [{k: r[k] for k in RESULT_FIELDS} for r in rows],
            "bias": [{k: r[k] for k in BIAS_FIELDS} for r in bias_rows],
            "classify": [{**{k: r[k] for k in CLASSIFY_FIELDS}, "per_class": r["per_class"]} for r in classify]}
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_results(path: Path) -> dict:
    """What `write_results` wrote (a file without the `classify` section reads as one with it empty);
    a ValueError naming `path` when it is not that."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot be read ({err})") from None
    if isinstance(data, dict):
        data.setdefault("classify", [])
    ok = (isinstance(data, dict) and isinstance(data.get("protocol"), str)
          and all(isinstance(data.get(key), list) and all(isinstance(r, dict) and set(fields) <= r.keys() for r in data[key])
                  for key, fields in SECTIONS.items()))
    if not ok:
        raise ValueError(f"{path}: not an lbgen results file (protocol, results {RESULT_FIELDS}, bias {BIAS_FIELDS})")
    return data


def _transfer_markdown(rows: list[dict], h2: str) -> list[str]:
    fractions = sorted({r["fraction"] for r in rows})
    lines = ["Top-1 accuracy (%) on each set's eval split.", "",
             "| backbone | dataset | fraction | train images | accuracy | L2 |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        l2 = "" if r["l2"] is None else f"{r['l2']:g}"
        lines.append(f"| {r['backbone']} | {r['dataset']} | {_fmt_fraction(r['fraction'])} | {r['train_images']} | {r['accuracy']:.2f} | {l2} |")
    lines += ["", f"{h2} Average over datasets", "", "| backbone | " + " | ".join(_fmt_fraction(f) for f in fractions) + " |",
              "|---|" + "---:|" * len(fractions)]
    for backbone, per in averages(rows).items():
        lines.append(f"| {backbone} | " + " | ".join(f"{per[f]:.2f}" for f in fractions) + " |")
    return lines


def _classify_markdown(classify: list[dict]) -> list[str]:
    lines = ["Accuracy (%) of each backbone's own classifier on real images of its classes (the paper's IN-val column); "
             "per-class top-1 in classify_per_class.csv.", "",
             "| backbone | set | images | classes | top-1 | top-5 |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['backbone']} | {r['dataset']} | {r['images']} | {r['classes']} | {r['top1']:.2f} | {r['top5']:.2f} |" for r in classify]
    return lines


def results_markdown(rows: list[dict], bias_rows: list[dict], protocol: str, level: int = 1, classify: list[dict] = ()) -> str:
    """The report: the transfer rows and their average over datasets (or the same-class table), then the bias table.

    `level`: the title's heading level (the run report nests these under its own headings).
    """
    h1, h2 = "#" * level, "#" * (level + 1)
    title = "Same-class accuracy" if protocol == "classify" else "Transfer results"
    lines = [f"{h1} {title} ({protocol} protocol)", ""]
    lines += _classify_markdown(classify) if protocol == "classify" else _transfer_markdown(rows, h2)
    if classify and protocol != "classify":  # `also_classify`: the backbones' own classifiers beside the protocol
        lines += ["", f"{h2} Same-class accuracy (classify protocol)", ""] + _classify_markdown(classify)
    if bias_rows:
        lines += ["", f"{h2} Background gap (ImageNet-9 style; lower is less biased)", "",
                  "| backbone | set | original | mixed_same | mixed_rand | BG_Gap |", "|---|---|---:|---:|---:|---:|"]
        for r in bias_rows:
            lines.append(f"| {r['backbone']} | {r['dataset']} | {r['original']:.2f} | {r['mixed_same']:.2f} | {r['mixed_rand']:.2f} | {r['bg_gap']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict], path: Path) -> None:
    """Accuracy vs. fraction: one panel per dataset plus the average, one line per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    panels = datasets + (["average"] if len(datasets) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    means = averages(rows)
    for ax, panel in zip(axes[0], panels):
        for backbone in means:
            if panel == "average":
                points = sorted(means[backbone].items())
            else:
                points = sorted((r["fraction"], r["accuracy"]) for r in rows if r["backbone"] == backbone and r["dataset"] == panel)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backbone)
        ax.set_xscale("log")
        ax.set_title(panel)
        ax.set_xlabel("fraction of training data")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
