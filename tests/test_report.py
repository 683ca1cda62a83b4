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
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lbgen.cli import main
from lbgen.config import ReportConfig, resolve, to_yaml
from lbgen.data.dataset import DATA_DIR, FORMAT, schema, shard_name, write_json_atomic, write_shard
from lbgen.stages.report import (
    FILES_DIR,
    ReportError,
    build_report,
    choose_rows,
    dataset_diversity,
    grid_tiles,
    mean_pairwise_distance,
    on_a_gpu_if_any,
    read_images,
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


def write_dataset(directory: Path, images: list[tuple[int, np.ndarray]], names: list[str], cfg) -> list[Path]:
    """Two shards (row groups of 2 rows) of (label, pixels) rows, their manifest and config: a whole dataset."""
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(to_yaml(cfg))
    rng = np.random.default_rng(0)
    rows = [{
        "image": {"bytes": png(pixels), "path": f"{label}_{i}.png"}, "label": label, "class_id": f"n{label}",
        "class_name": names[label], "prompt": names[label], "seed": i, "index": i, "width": SIZE, "height": SIZE,
        "clip_score": float(rng.uniform(0, 0.3)), "clip_agrees": bool(label == 1), "iqa_score": float(rng.uniform()),
        "generator": "test",
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
    """metrics.jsonl (warm-up + 3 steps), config.yaml, and two sample grids with one flat colour per class."""
    import torch

    from lbgen.stages.finetune import save_grid

    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(to_yaml(cfg))
    lines = [{"phase": "warmup", "loss_d": 1.4, "d_acc_real": 0.25, "d_acc_fake": 1.0}]
    for step in range(1, 4):
        lines.append({"loss": 2.0 - 0.1 * step, "loss_in": 0.9, "loss_en": 0.7, "loss_q": 1.0, "clip_cos": 0.1 * step,
                      "iqa_score": 0.2, "loss_d": 1.3, "d_acc_real": 0.5, "d_acc_fake": 1.0, "step": step})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    tiles = torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 6, 6)
    for step in (0, 3):
        save_grid(tiles, directory / "samples" / f"step-{step:06d}.png")


def write_pretrain_and_evaluate(run: Path) -> None:
    from lbgen.stages.evaluate import plot_results, results_markdown

    (run / "pretrain").mkdir()
    (run / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(
        {"epoch": e, "train_loss": 2.3 - 0.1 * e, "val_loss": 2.4 - 0.1 * e, "val_acc": 0.1 * e, "val_images": 7, "lr": 1e-3 / e}) + "\n"
        for e in (1, 2)))
    (run / "evaluate").mkdir()
    rows = [{"backbone": b, "dataset": "shapes", "protocol": "linear", "fraction": f, "train_images": int(40 * f),
             "accuracy": acc, "l2": 0.1, "seconds": 0.1}
            for b, accs in (("runs/pretrain", (20.0, 30.0)), ("random:test_resnet", (15.0, 25.0))) for f, acc in zip((0.5, 1.0), accs)]
    (run / "evaluate" / "results.md").write_text(results_markdown(rows, [], "linear"))
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
    build_report(run, ReportConfig(diversity_images=3))
    return run


# ---------------------------------------------------------------- units


def test_mean_pairwise_distance_is_zero_for_identical_and_positive_for_different_features():
    v = np.array([0.3, -1.2, 0.5])
    assert mean_pairwise_distance(np.stack([v, v, 2 * v])) == pytest.approx(0, abs=1e-7)
    assert mean_pairwise_distance(np.eye(3)) == pytest.approx(1.0)  # orthogonal: cosine distance 1
    assert mean_pairwise_distance(np.array([[1.0, 0.0], [1.0, 1.0]])) == pytest.approx(1 - 2 ** -0.5)


def test_choose_rows_is_seeded_bounded_and_per_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 50)
    chosen = choose_rows(labels, 4, seed=7)
    assert {k: len(v) for k, v in chosen.items()} == {0: 4, 1: 3, 2: 4}
    assert all((labels[rows] == label).all() for label, rows in chosen.items())
    again = choose_rows(labels, 4, seed=7)
    assert all(np.array_equal(chosen[k], again[k]) for k in chosen)
    # A class's choice depends on its own rows only, not on the other classes.
    alone = choose_rows(labels[labels == 2], 4, seed=7)[2]
    assert np.array_equal(alone + 13, chosen[2])
    assert not all(np.array_equal(chosen[k], choose_rows(labels, 4, seed=8)[k]) for k in chosen)


def test_read_images_returns_the_bytes_at_global_rows_across_shards_and_row_groups(run_dir):
    shards = sorted((run_dir / "generate" / DATA_DIR).glob("*.parquet"))
    everything = [row["bytes"] for path in shards for row in pq.read_table(path, columns=["image"]).column("image").to_pylist()]
    positions = np.array([0, 3, 4, 5, 8])  # rows in both shards and in several row groups of each
    assert read_images(shards, positions) == [everything[p] for p in positions]


def test_grid_tiles_recovers_each_class_sample_from_a_finetune_grid(run_dir):
    grid = Image.open(run_dir / "finetune" / "samples" / "step-000000.png").convert("RGB")
    tiles = grid_tiles(grid, 10, Path("grid.png"))  # 10 samples: two rows of 8 columns
    colours = np.linspace(0, 1, 30).reshape(10, 3)
    for tile, colour in zip(tiles, colours):
        assert tile.size == (6, 6)
        assert np.abs(np.asarray(tile).astype(float) - colour * 255).max() <= 1
    with pytest.raises(ReportError, match="grid.png.*not a grid of 5 samples"):
        grid_tiles(grid, 5, Path("grid.png"))  # 5 columns do not divide 8 tiles of width


@pytest.mark.ray
def test_diversity_in_a_ray_task_equals_the_local_one(run_dir, ray_local):
    """The path a GPU cluster takes (a Ray task; here it asks for no GPU, which this machine lacks)."""
    from lbgen.config import Config, from_dict, load_yaml

    generate = run_dir / "generate"
    shards = sorted((generate / DATA_DIR).glob("*.parquet"))
    labels = np.concatenate([pq.read_table(p, columns=["label"]).column("label").to_numpy() for p in shards])
    cfg = from_dict(Config, load_yaml(generate / "config.yaml"))
    local = dataset_diversity(shards, labels, cfg, 3)
    remote = on_a_gpu_if_any(dataset_diversity, shards, labels, cfg, 3, num_gpus=0)
    assert remote.keys() == local.keys()
    assert all(remote[k] == pytest.approx(local[k], rel=1e-4, abs=1e-7) for k in local)  # thread counts differ
    assert sorted(local) == [0, 1] and local[0] < 1e-5 < local[1]


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


def test_stages_not_run_yet_get_notes(tmp_path):
    paths = build_report(tmp_path)
    text = paths["markdown"].read_text()
    for heading in SECTIONS[:3] + SECTIONS[4:]:
        assert heading + "\n" in text
    for missing in ("finetune/metrics.jsonl", "generate/manifest.json", "pretrain/metrics.jsonl", "evaluate/results.md"):
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
    (lambda run: (run / "finetune" / "samples" / "step-000003.png").write_bytes(b""), "step-000003.png: not a readable image"),
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
    assert main(["report", str(run), "--diversity-images", "2"]) == 0
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
