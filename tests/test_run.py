"""`lbgen run`: a run killed during generation and re-run goes through every stage end to end on the
tiny preset (real local Ray), ending with the dataset an uninterrupted generation makes; a further
re-run skips every stage."""

import csv
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rows import assert_same_pixels_and_row, read_rows

from lbgen.cli import main
from lbgen.config import resolve
from lbgen.data.classes import load_class_table
from lbgen.data.reader import inspect_dataset
from lbgen.stages.generate import generate
from lbgen.stages.run import stage_configs

REPO = Path(__file__).resolve().parents[1]
SMALL = (
    "finetune: {max_steps: 2, num_steps: 2}\n"
    "generate: {images_per_class: 3, rows_per_shard: 5, row_group_rows: 5}\n"  # tiny10: 30 rows, 6 shards
    "pretrain: {epochs: 1, batch_size: 16}\n"
    "evaluate: {fractions: [1.0]}\n"
    "make_downstream: {train_per_class: 8, test_per_class: 4}\n"
)


def run_args(out: Path, config: Path) -> list[str]:
    return ["run", "--preset", "tiny", "--output", str(out), "--config", str(config)]


def killed_then_completed(root: Path) -> dict:
    """Scenario `run-killed-then-completed` (tests/scenarios.py), in its own process with its own Ray:
    a real `lbgen run` process SIGKILLed during generation, then the same command run to the end.

    Returns the output, the config, and what the kill left: the shards visible and their rows, whether
    pretrain had started and whether the dataset then passed `inspect`."""
    from scenarios import local_ray

    config, out = root / "small.yaml", root / "run"
    config.write_text(SMALL)
    with local_ray() as ray:
        cmd = [sys.executable, "-m", "lbgen.cli", *run_args(out, config), "--address", ray.get_runtime_context().gcs_address]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data, seen, deadline = out / "generate" / "data", set(), time.time() + 300
        try:
            while time.time() < deadline and proc.poll() is None and not seen:
                seen = {p.name for p in data.glob("train-*.parquet")} if data.exists() else set()
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        at_kill = {"shards": sorted(seen), "pretrain_started": (out / "pretrain").exists(),
                   "shard_rows": [pq.read_metadata(path).num_rows for path in data.glob("train-*.parquet")],
                   "inspect_ok": inspect_dataset(out / "generate").ok}
        code = main(run_args(out, config))
    return {"output": str(out), "config": str(config), "at_kill": at_kill, "code": code}


SCENARIOS = {"run-killed-then-completed": killed_then_completed}


class ReachedFinetune(Exception):
    pass


def test_run_checks_once_before_ray_and_hands_the_checked_table_on(tmp_path, monkeypatch):
    """`lbgen run`'s pre-flight loads the class table once and probes the quality metric once; `run`
    does not check again, and fine-tuning gets the checked table instead of checking itself."""
    import lbgen.cli
    import lbgen.data.classes
    import lbgen.stages.finetune
    import lbgen.stages.generate
    import lbgen.stages.pretrain

    loads, probes, order = [], [], []
    original = lbgen.data.classes.load_class_table
    for module in list(sys.modules.values()):  # every binding of the function, wherever imported
        if vars(module).get("load_class_table") is original:
            monkeypatch.setattr(module, "load_class_table", lambda spec: loads.append(spec) or original(spec))
    probe = lbgen.stages.finetune.has_pixel_gradient
    monkeypatch.setattr(lbgen.stages.finetune, "has_pixel_gradient", lambda quality: probes.append(quality) or probe(quality))
    monkeypatch.setattr(lbgen.cli, "init_ray", lambda address: order.append(("ray", len(loads), len(probes))))

    def finetune(cfg, table=None):
        raise ReachedFinetune(table)

    monkeypatch.setattr(lbgen.stages.finetune, "finetune", finetune)
    with pytest.raises(ReachedFinetune) as reached:
        main(["run", "--preset", "tiny", "--output", str(tmp_path / "run")])
    assert order == [("ray", 1, 1)]  # both before Ray starts
    assert len(loads) == 1 and len(probes) == 1
    assert reached.value.args[0].ids == load_class_table("tiny10").ids


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.scenario("run-killed-then-completed")
def test_run_all_stages_then_skip_them(scenario, ray_local, capsys):
    """At the kill, fine-tuning was done and generation under way: every shard visible was whole, pretrain
    had not started and the dataset was incomplete. The re-run went through every stage; a third run
    skips them all."""
    out, config, at_kill = Path(scenario["output"]), Path(scenario["config"]), scenario["at_kill"]
    assert at_kill["shards"] and not at_kill["pretrain_started"], "the run was not killed during generation"
    assert at_kill["shard_rows"] and set(at_kill["shard_rows"]) == {5}  # whole the moment it is visible
    assert not at_kill["inspect_ok"]
    assert scenario["code"] == 0
    for path in ("finetune/pytorch_lora_weights.safetensors", "generate/manifest.json", "downstream/train",
                 "pretrain/backbone.safetensors", "evaluate/results.md"):
        assert (out / path).exists(), path
    with open(out / "evaluate" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2  # the pre-trained backbone and its random-init baseline, one fraction
    # The same records in results.json, which the report reads.
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert [(r["backbone"], r["accuracy"]) for r in results["results"]] == [(r["backbone"], float(r["accuracy"])) for r in rows]
    # Fine-tuning's samples: one file per shown class, named by class id, beside each grid.
    ids = load_class_table("tiny10").ids[: resolve("tiny").finetune.sample_classes]
    for step in ("step-000000", "step-000002"):
        assert (out / "finetune" / "samples" / f"{step}.png").exists()
        assert sorted(p.name for p in (out / "finetune" / "samples" / step).iterdir()) == sorted(f"{i}.png" for i in ids)
    # The report, every stage in it (tests/test_report.py checks its content and its rendering).
    report = (out / "report.md").read_text()
    assert "Not run yet" not in report and report.count("| complete |") == 5
    assert (out / "report.html").read_text().count('src="data:image/png;base64,') == 7
    capsys.readouterr()
    assert main(run_args(out, config)) == 0
    log = capsys.readouterr().out
    for stage in ("finetune", "generate", "pretrain", "evaluate"):
        assert f"[{stage}] complete, skipped" in log
    assert f"[report] {out.resolve() / 'report.html'}" in log


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.scenario("run-killed-then-completed")
def test_run_killed_during_generation_resumes_to_the_same_dataset(scenario, ray_local, tmp_path):
    """The resumed run's dataset equals one `generate` makes uninterrupted with the same settings and LoRA."""
    out = Path(scenario["output"])
    wired = stage_configs(resolve("tiny", scenario["config"], {"run": {"output": str(out)}}))
    reference = tmp_path / "reference"
    generate(dataclasses.replace(wired, generate=dataclasses.replace(wired.generate, output=str(reference))), show_progress=False)
    a, b = read_rows(reference), read_rows(out / "generate")
    assert a.keys() == b.keys()
    for key in a:
        assert_same_pixels_and_row(a[key], b[key])
    assert inspect_dataset(out / "generate").ok
