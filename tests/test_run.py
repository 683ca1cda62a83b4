"""`lbgen run`: every stage end to end on the tiny preset (real local Ray), then a re-run that skips them."""

import csv

import pytest

from lbgen.cli import main


@pytest.mark.ray
@pytest.mark.slow
def test_run_all_stages_then_skip_them(ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--output", str(out)]
    config = tmp_path / "small.yaml"
    config.write_text(
        "finetune: {max_steps: 2}\n"
        "generate: {images_per_class: 3, rows_per_shard: 10}\n"
        "pretrain: {epochs: 1, batch_size: 16}\n"
        "evaluate: {fractions: [1.0]}\n"
        "make_downstream: {train_per_class: 8, test_per_class: 4}\n"
    )
    assert main([*args, "--config", str(config)]) == 0
    for path in ("finetune/pytorch_lora_weights.safetensors", "generate/manifest.json", "downstream/train",
                 "pretrain/backbone.safetensors", "evaluate/results.md"):
        assert (out / path).exists(), path
    with open(out / "evaluate" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2  # the pre-trained backbone and its random-init baseline, one fraction
    capsys.readouterr()
    assert main([*args, "--config", str(config)]) == 0
    log = capsys.readouterr().out
    for stage in ("finetune", "generate", "pretrain", "evaluate"):
        assert f"[{stage}] complete, skipped" in log
