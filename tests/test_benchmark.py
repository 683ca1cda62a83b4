"""`lbgen benchmark`: the steady rate, the projection from it, FLOPs counted on the model, bad input refused."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lbgen.cli import main
from lbgen.config import resolve
from lbgen.data.classes import load_class_table
from lbgen.stages.benchmark import flops_per_image, timed_batches
from lbgen.stages.generate import GenerateBatch


@pytest.mark.slow
def test_benchmark_on_the_miniature_writes_its_figures_and_projects_from_the_steady_rate(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--preset", "mini", "--batches", "1", "--price-per-gpu-hour", "2.5", "--peak-tflops", "0.1",
                 "--json", str(out)]) == 0
    found = json.loads(out.read_text())
    print(f"benchmark on mini: {json.dumps(found)}")
    assert found["device"] == "cpu" and found["steady_batches"] == 1 and found["images_per_s"] > 0
    assert found["dataset_images"] == 10 * 40  # fashion10 x the mini preset's 40 per class
    assert found["gpu_hours"] == pytest.approx(400 / found["images_per_s"] / 3600, rel=1e-3, abs=1e-3)
    assert found["cost"] == pytest.approx(found["gpu_hours"] * 2.5, rel=1e-2, abs=0.01)
    assert found["achieved_tflops"] == pytest.approx(found["flops_per_image"] * found["images_per_s"] / 1e12, rel=1e-2, abs=1e-4)
    assert found["percent_of_peak"] == pytest.approx(100 * found["achieved_tflops"] / 0.1, rel=1e-2, abs=0.01)
    assert found["largest_micro_batch"] is None  # CUDA only
    assert "images/s steady over 1 batch(es)" in capsys.readouterr().out


def test_flops_per_image_grow_linearly_with_the_denoising_steps():
    """Each step is one CFG UNet call on the same shapes: the count is a + b x steps, with b > 0."""
    counts = []
    for steps in (2, 4, 6):
        cfg = resolve("tiny", overrides={"generate": {"steps": steps}})
        batch = timed_batches(cfg, load_class_table(cfg.classes), 1)[0]
        counts.append(flops_per_image(GenerateBatch(dataclasses.asdict(cfg)), batch))
    assert counts[1] - counts[0] == pytest.approx(counts[2] - counts[1], rel=1e-6) and counts[1] > counts[0] > 0


@pytest.mark.parametrize("flag, value, needle", [("--batches", "0", "benchmark.batches must be > 0"),
                                                 ("--price-per-gpu-hour", "-1", "benchmark.price_per_gpu_hour must be >= 0"),
                                                 ("--json", "/no/such/dir/b.json", "benchmark.json: the folder of /no/such/dir/b.json")])
def test_bad_settings_are_refused_in_one_line(flag, value, needle, capsys):
    assert main(["benchmark", "--preset", "tiny", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
