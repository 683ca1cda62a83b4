"""The run report: diversity measure, row choice and reads, sections and notes, errors, CLI, and a real render in headless Chromium."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from lbgen.cli import main
from lbgen.config import ReportConfig, resolve, to_yaml
from lbgen.data.format import DATA_DIR, FORMAT, schema, shard_name, write_shard
from lbgen.data.writer import write_json_atomic
from lbgen.stages.report import (
    FILES_DIR,
    ReportError,
    build_report,
)

SIZE = 16  # pixels of the constructed dataset's images
FIGURES = ["finetune_curves.png", "finetune_samples.png", "dataset_scores.png", "dataset_agreement.png",
           "dataset_diversity.png", "pretrain_curves.png", "accuracy_vs_fraction.png"]
SECTIONS = ["# lbgen run report", "## Stages", "## Fine-tuning", "### Samples per class, before and after fine-tuning",
            "## Generated dataset", "## Pre-training", "## Transfer"]


# ---------------------------------------------------------------- a small constructed run


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def stand_in_embedding(pixels: np.ndarray) -> list[float]:
    """A CLIP embedding's stand-in that is a function of the pixels: equal images, equal embeddings."""
    return np.random.default_rng(list(pixels.tobytes()[:32])).standard_normal(8).tolist()


def write_dataset(directory: Path, images: list[tuple[int, np.ndarray]], names: list[str], cfg) -> list[Path]:
    """Two shards (row groups of 2 rows) of (label, pixels) rows, their manifest and config: a whole dataset."""
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(to_yaml(cfg))
    rng = np.random.default_rng(0)
    rows = [{
        "image": {"bytes": png(pixels), "path": f"{label}_{i}.png"}, "label": label, "class_id": f"n{label}",
        "class_name": names[label], "prompt": names[label], "seed": i, "index": i, "width": SIZE, "height": SIZE,
        "clip_score": float(rng.uniform(0, 0.3)), "clip_agrees": bool(label == 1), "iqa_score": float(rng.uniform()),
        "clip_embedding": stand_in_embedding(pixels), "generator": "test",
    } for i, (label, pixels) in enumerate(images)]
    half = len(rows) // 2
    paths, entries = [], {}
    for shard, part in enumerate((rows[:half], rows[half:])):
        path = directory / DATA_DIR / shard_name(shard, 2)
        table = pa.Table.from_pylist(part, schema=schema(names))
        entries[path.name] = write_shard(table, path, row_group_rows=2)
        paths.append(path)
    write_json_atomic(directory / "manifest.json", {
        "format": FORMAT, "generator": "test", "label_names": names, "num_shards": 2, "shards": entries,
        "totals": {"rows": len(rows), "shards": 2},
    })
    return paths


def write_finetune(directory: Path, cfg, colours: np.ndarray) -> None:
    """metrics.jsonl (warm-up + 3 steps), config.yaml, and the samples of two steps with one flat colour per class."""
    import torch

    from lbgen.data.classes import load_class_table
    from lbgen.stages.finetune import save_samples

    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(to_yaml(cfg))
    lines = [{"phase": "warmup", "loss_d": 1.4, "d_acc_real": 0.25, "d_acc_fake": 1.0}]
    for step in range(1, 4):
        lines.append({"loss": 2.0 - 0.1 * step, "loss_in": 0.9, "loss_en": 0.7, "loss_q": 1.0, "clip_cos": 0.1 * step,
                      "iqa_score": 0.2, "loss_d": 1.3, "d_acc_real": 0.5, "d_acc_fake": 1.0, "step": step})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    tiles = torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 6, 6)
    for step in (0, 3):
        save_samples(tiles, load_class_table(cfg.classes).ids, directory / "samples", step)


def write_pretrain_and_evaluate(run: Path) -> None:
    from lbgen.data.results import RESULTS_JSON, plot_results, results_markdown, write_results

    (run / "pretrain").mkdir()
    (run / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(
        {"epoch": e, "train_loss": 2.3 - 0.1 * e, "val_loss": 2.4 - 0.1 * e, "val_acc": 0.1 * e, "val_images": 7, "lr": 1e-3 / e}) + "\n"
        for e in (1, 2)))
    (run / "evaluate").mkdir()
    rows = [{"backbone": b, "dataset": "shapes", "protocol": "linear", "fraction": f, "train_images": int(40 * f),
             "accuracy": acc, "l2": 0.1, "seconds": 0.1}
            for b, accs in (("runs/pretrain", (20.0, 30.0)), ("random:test_resnet", (15.0, 25.0))) for f, acc in zip((0.5, 1.0), accs)]
    (run / "evaluate" / "results.md").write_text(results_markdown(rows, [], "linear"))
    write_results(rows, [], "linear", run / "evaluate" / RESULTS_JSON)
    plot_results(rows, run / "evaluate" / "accuracy_vs_fraction.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with every stage's outputs, small: class 0's four images are one image, class 1's differ."""
    run = tmp_path_factory.mktemp("report") / "run"
    cfg = resolve("tiny", overrides={"finetune": {"sample_classes": 10}})
    names = ["tench", "English Springer Spaniel", "cassette player"]
    rng = np.random.default_rng(1)
    same = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    images = [(0, same)] * 4 + [(1, rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(4)] + [(2, same)]
    write_dataset(run / "generate", images, names, cfg)
    write_finetune(run / "finetune", cfg, np.linspace(0, 1, 30).reshape(10, 3))
    write_pretrain_and_evaluate(run)
    build_report(run, ReportConfig())
    return run


# ---------------------------------------------------------------- units


def test_finetune_writes_each_class_sample_as_its_own_tile_beside_the_grid(run_dir):
    from lbgen.data.classes import load_class_table
    from lbgen.stages.finetune import sample_tile

    samples = run_dir / "finetune" / "samples"
    ids = load_class_table("tiny10").ids
    colours = np.linspace(0, 1, 30).reshape(10, 3)
    for class_id, colour in zip(ids, colours):
        tile = Image.open(samples / "step-000000" / f"{class_id}.png").convert("RGB")
        assert tile.size == (6, 6)
        assert np.abs(np.asarray(tile).astype(float) - colour * 255).max() <= 1
    assert sorted(p.name for p in (samples / "step-000003").iterdir()) == sorted(f"{i}.png" for i in ids)
    assert Image.open(samples / "step-000000.png").size == (8 * 8 + 2, 2 * 8 + 2)  # the grid, for people
    assert sample_tile(samples, "a/b") == samples / "a%2Fb.png"  # any class id makes one file name


def test_the_transfer_section_is_rendered_from_the_results_records(run_dir, tmp_path):
    text = (run_dir / "report.md").read_text()
    assert "### Transfer results (linear protocol)" in text and "#### Average over datasets" in text
    assert "| runs/pretrain | shapes | 50% | 20 | 20.00 | 0.1 |" in text
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "evaluate" / "results.md").unlink()  # evaluate's Markdown is for people; the report reads the records
    data = json.loads((run / "evaluate" / "results.json").read_text())
    data["results"][0]["accuracy"] = 99.5
    (run / "evaluate" / "results.json").write_text(json.dumps(data))
    assert "| runs/pretrain | shapes | 50% | 20 | 99.50 | 0.1 |" in build_report(run)["markdown"].read_text()


# ---------------------------------------------------------------- the report


def test_report_has_every_section_and_figure_in_both_files(run_dir):
    text = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    positions = [text.index(heading + "\n") for heading in SECTIONS]
    assert positions == sorted(positions)
    assert "Not run yet" not in text
    for name in FIGURES:
        assert f"]({FILES_DIR}/{name})" in text
        assert Image.open(run_dir / FILES_DIR / name).size[0] > 100
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing fetched from elsewhere
    assert "<th>class</th>" in page and "Transfer results (linear protocol)" in page
    for name in ("tench", "English Springer Spaniel"):
        assert name in text


def test_diversity_is_zero_for_identical_images_and_positive_for_different_ones(run_dir):
    rows = {line.split("|")[2].strip(): line.split("|")[5].strip()
            for line in (run_dir / "report.md").read_text().splitlines() if re.match(r"^\| \d+ \|", line)}
    assert float(rows["tench"]) == pytest.approx(0, abs=1e-5)
    assert float(rows["English Springer Spaniel"]) > 1e-3
    assert rows["cassette player"] == "n/a"  # one image: no pair


def test_near_duplicate_share_per_class_comes_from_the_stored_embeddings(run_dir):
    shares = {line.split("|")[2].strip(): line.split("|")[6].strip()
              for line in (run_dir / "report.md").read_text().splitlines() if re.match(r"^\| \d+ \|", line)}
    assert shares == {"tench": "1.00", "English Springer Spaniel": "0.00", "cassette player": "0.00"}
    assert "Near-duplicates (CLIP cosine >= 0.95 within a class): 6 pair(s)" in (run_dir / "report.md").read_text()


def test_stages_not_run_yet_get_notes(tmp_path):
    paths = build_report(tmp_path)
    text = paths["markdown"].read_text()
    for heading in SECTIONS[:3] + SECTIONS[4:]:
        assert heading + "\n" in text
    for missing in ("finetune/metrics.jsonl", "generate/manifest.json", "pretrain/metrics.jsonl", "evaluate/results.json"):
        assert f"Not run yet (no `{missing}`)." in text
    assert text.count("| not run yet |") == 5
    assert "<img" not in paths["html"].read_text()


def test_a_metrics_line_being_written_is_left_out(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with (run / "finetune" / "metrics.jsonl").open("a") as f:
        f.write('{"loss": 1.5, "st')  # a running stage's next line, half written
    assert "3 steps logged" in build_report(run)["markdown"].read_text()


@pytest.mark.parametrize("damage, named", [
    (lambda run: (run / "finetune" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n'), "finetune/metrics.jsonl: line 2 is not JSON"),
    (lambda run: (run / "generate" / DATA_DIR / shard_name(1, 2)).write_bytes(b"PAR1 broken"), f"{shard_name(1, 2)}: unreadable Parquet shard"),
    (lambda run: (run / "evaluate" / "accuracy_vs_fraction.png").write_bytes(b"\x89PNG broken"), "accuracy_vs_fraction.png: not a readable image"),
    (lambda run: (run / "finetune" / "samples" / "step-000003" / "n01440764.png").write_bytes(b""),
     "step-000003/n01440764.png: not a readable image"),
    (lambda run: (run / "finetune" / "samples" / "step-000003" / "n02102040.png").unlink(), "step-000003/n02102040.png: missing"),
    (lambda run: (run / "evaluate" / "results.json").write_text('{"protocol": "linear"}'), "results.json: not an lbgen results file"),
    (lambda run: (run / "evaluate" / "results.json").write_text('{"prot'), "results.json: cannot be read"),
])
def test_a_damaged_input_is_an_error_naming_the_file(run_dir, tmp_path, damage, named):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    damage(run)
    with pytest.raises(ReportError, match=re.escape(named)):
        build_report(run)


def test_cli_report_rebuilds_it_and_refuses_a_missing_directory(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "report.html").unlink()
    assert main(["report", str(run), "--near-duplicate-cosine", "0.9"]) == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    assert (run / "report.html").exists()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lbgen report: error:") and str(tmp_path / "nowhere") in err


# ---------------------------------------------------------------- rendering in a real browser

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)

# Appended to a copy of the page: on load, writes how many images decoded (complete, non-zero width) of how many.
IMAGE_CHECK = """
<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.createElement("pre");
  out.id = "lbgen-image-check";
  out.textContent = loaded + "/" + images.length;
  document.body.appendChild(out);
});
</script>
"""


def images_loaded(page: str, tmp_path: Path) -> tuple[int, int]:
    """(decoded images, images) of `page` rendered by headless Chromium."""
    path = tmp_path / "check.html"
    path.write_text(page + IMAGE_CHECK)
    # --no-sandbox: Chromium refuses to run as root with its sandbox; the page is our own file.
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
        check=False, capture_output=True, text=True, timeout=180,
    )
    found = re.search(r'<pre id="lbgen-image-check">(\d+)/(\d+)</pre>', done.stdout)
    assert found, f"no image check in Chromium's DOM (exit {done.returncode}): {done.stderr[-1500:]}"
    return int(found[1]), int(found[2])


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); the render check needs a browser")
def test_report_renders_every_image_in_headless_chromium(run_dir, tmp_path):
    page = (run_dir / "report.html").read_text()
    assert images_loaded(page, tmp_path) == (len(FIGURES), len(FIGURES))
    # The check can fail: one damaged data URI leaves one image undecoded.
    broken = page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    assert images_loaded(broken, tmp_path) == (len(FIGURES) - 1, len(FIGURES))
