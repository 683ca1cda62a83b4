"""Resource pre-flight (lbgen/runtime/resources.py): a plan the cluster cannot hold is refused in one line
instead of waiting forever; the packing itself is plain Python."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbgen.cli import main
from lbgen.runtime import resources
from lbgen.runtime.locks import LOCK_FILE
from lbgen.runtime.resources import Request, unplaced

HERE = Path(__file__).resolve().parent
GPU_NODE = {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}


def test_generation_actor_and_scorer_share_one_gpu():
    gen, score = Request("generation actor(s)", 1, {"CPU": 1, "GPU": 0.75}), Request("scoring actor(s)", 1, {"CPU": 0.25, "GPU": 0.25})
    assert unplaced([gen, score], [GPU_NODE]) == []
    assert unplaced([Request("generation actor(s)", 2, {"CPU": 1, "GPU": 0.75}), score], [GPU_NODE]) == ["1 of 2 generation actor(s)"]
    assert unplaced([Request("generation actor(s)", 2, {"CPU": 1, "GPU": 0.75}), score], [GPU_NODE, GPU_NODE]) == []


def test_a_bundle_fits_on_one_node_not_across_two():
    worker = Request("training worker(s)", 1, {"CPU": 6})
    assert unplaced([worker], [{"CPU": 4}, {"CPU": 4}]) == ["1 of 1 training worker(s)"]
    assert unplaced([worker], [{"CPU": 4}, {"CPU": 8}]) == []


def test_accelerator_type_needs_a_node_that_has_it():
    worker = Request("training worker(s)", 2, {"CPU": 1, "GPU": 1, "accelerator_type:A100": 0.001})
    a100 = {"CPU": 8, "GPU": 8, "accelerator_type:A100": 1}
    assert unplaced([worker], [GPU_NODE, GPU_NODE]) == ["2 of 2 training worker(s)"]
    assert unplaced([worker], [GPU_NODE, a100]) == []


def test_largest_units_are_placed_first():
    # First-fit in the given order would put the small task on the 1-CPU node's neighbour and strand the big one.
    big, small = Request("actor", 1, {"CPU": 2}), Request("task slot", 1, {"CPU": 1})
    assert unplaced([small, big], [{"CPU": 2}, {"CPU": 1}]) == []


def _attached_cluster(monkeypatch, views: list[list[dict]]) -> tuple[list, list]:
    """`require` against a cluster that may grow, whose successive node lists are `views` (the last
    repeats); returns the bundles asked of the autoscaler and what was said."""
    import ray.autoscaler.sdk

    asked, said, looks = [], [], iter(views)
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: asked.append(bundles))
    monkeypatch.setattr(resources, "cluster_can_grow", lambda: True)
    monkeypatch.setattr(resources, "cluster_nodes", lambda: next(looks, views[-1]))
    monkeypatch.setattr(resources.time, "sleep", lambda s: None)
    return asked, said


def test_an_attached_cluster_is_asked_to_grow_and_waited_for(monkeypatch):
    worker = Request("training worker(s)", 2, {"CPU": 2})
    asked, said = _attached_cluster(monkeypatch, [[{"CPU": 2}], [{"CPU": 2}], [{"CPU": 2}, {"CPU": 2}]])
    resources.require("pretrain", [worker], "pretrain.cluster.workers", 60, said.append)
    # The bundles at each of the two polls (Ray Data's coordinator replaces the cluster's request every 20 s,
    # so it is made again each time), then the request withdrawn.
    assert asked == [[{"CPU": 2}, {"CPU": 2}], [{"CPU": 2}, {"CPU": 2}], []]
    assert said == ["[pretrain] waiting up to 60 s for the cluster to grow to 2 training worker(s) x {CPU: 2}"]


def test_a_cluster_that_does_not_grow_in_time_is_refused(monkeypatch):
    worker = Request("training worker(s)", 2, {"CPU": 2})
    asked, said = _attached_cluster(monkeypatch, [[{"CPU": 2}]])
    with pytest.raises(resources.ResourceError, match=r"cannot hold 1 of 2 training worker\(s\); lower pretrain.cluster.workers"):
        resources.require("pretrain", [worker], "pretrain.cluster.workers", 0.05, said.append)
    assert asked[-1] == [] and len(said) == 1


def test_a_negative_wait_is_refused_naming_the_setting():
    from lbgen.config import ConfigError, resolve

    with pytest.raises(ConfigError, match=r"^resource_wait_s must be >= 0, got -1"):
        resolve("tiny", overrides={"resource_wait_s": -1})


def _refusal(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.ray
def test_generate_that_would_hold_every_cpu_is_refused_in_one_line(ray_local, tmp_path, capsys):
    """2 generation actors x 1 CPU on a 2-CPU Ray leave nothing for the planning and encoding tasks (or, with a
    separate scoring pool, for the scorer)."""
    out = tmp_path / "gen"
    argv = ["generate", "--preset", "tiny", "--workers", "2", "--cpus-per-worker", "1", "--output", str(out)]
    line = _refusal(capsys, argv)
    assert line.startswith("lbgen generate: error: generate needs 2 generation actor(s) x {CPU: 1} + 1 planning/encoding task slot")
    assert "cannot hold 1 of 1 planning/encoding task slot" in line
    line = _refusal(capsys, [*argv, "--no-score-beside"])
    assert line.startswith("lbgen generate: error: generate needs 2 generation actor(s) x {CPU: 1} + 1 scoring actor(s)")
    assert "cannot hold 1 of 1 scoring actor(s), 1 of 1 planning/encoding task slot" in line
    assert "{CPU: 2}" in line and "generate.workers (--workers)" in line
    assert not list(out.glob("data/*.parquet"))


@pytest.mark.ray
def test_training_workers_the_cluster_cannot_hold_are_refused_in_one_line(ray_local, tmp_path, capsys):
    line = _refusal(capsys, ["finetune", "--preset", "tiny", "--workers", "3", "--output", str(tmp_path / "ft")])
    assert line.startswith("lbgen finetune: error: finetune needs 3 training worker(s) x {CPU: 1} at once")
    assert "finetune.cluster.workers (--workers)" in line
    line = _refusal(capsys, ["finetune", "--preset", "tiny", "--accelerator-type", "A100", "--use-gpu", "--output", str(tmp_path / "ft")])
    assert "x {CPU: 1, GPU: 1, accelerator_type:A100: 0.001}" in line


HANG = """
import sys
import ray
import lbgen.runtime.resources as resources
resources.require = lambda *args, **kwargs: None  # the check this test is about, removed
ray.init(num_cpus=2, include_dashboard=False)  # 2 CPUs on any machine
from lbgen.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_without_the_check_the_same_generate_waits_forever(tmp_path):
    """The hang the check prevents, reproduced: 20 s after the actors asked for every CPU, no image is made."""
    out = tmp_path / "gen"
    args = ["generate", "--preset", "tiny", "--workers", "2", "--cpus-per-worker", "1", "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", HANG, *args], cwd=HERE.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / LOCK_FILE).exists():
            time.sleep(0.5)  # the output is locked once Ray is up, just before the pipeline starts
        assert (out / LOCK_FILE).exists(), proc.stderr.read()[-2000:] if proc.poll() is not None else "no lock"
        time.sleep(20)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert not list(out.glob("data/*.parquet"))
    finally:
        proc.send_signal(signal.SIGINT)  # the CLI's own exit: its local Ray shuts down with it
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
