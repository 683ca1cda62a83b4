"""The Ray Jobs setup: the shipped `jobs/*.yaml` stage configs, and a real `ray job submit` round trip.

The round trip (a scenario, tests/scenarios.py) starts its own Ray head (loopback dashboard, own temp dir
and ports) in a process session of its own and stops exactly that head, never `ray stop`: other Ray
clusters on the machine (the session's `ray_local` among them) are left alone, and this module never
calls `ray.init`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from lbgen.cli import main
from lbgen.config import PRESETS, resolve
from lbgen.stages import STAGES
from lbgen.stages.run import stage_configs

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
SETUPS = ("tiny", "sd15-in1k")


def job(stage: str, setup: str):
    return resolve(config_file=JOBS / f"{stage}-{setup}.yaml")


def test_every_job_file_is_a_stage_and_a_setup_and_resolves_with_its_own_preset():
    import yaml

    files = sorted(JOBS.glob("*.yaml"))
    assert files
    for path in files:  # <stage>-<setup>.yaml, or <stage>-<setup>-<variant>.yaml for a second job of that stage
        stage = next((s.name for s in STAGES if path.stem.startswith(s.name + "-")), None)
        assert stage, f"{path.name} is not <stage>-<setup>.yaml"
        rest = path.stem[len(stage) + 1:]
        setup = max((p for p in PRESETS if rest == p or rest.startswith(p + "-")), key=len, default=None)
        assert setup in PRESETS, path.name
        assert yaml.safe_load(path.read_text())["preset"] == setup, path.name
        resolve(config_file=path)


@pytest.mark.parametrize("setup", SETUPS)
def test_stage_jobs_chain_each_output_into_the_next_stage(setup):
    finetune, generate, pretrain, evaluate = (job(s, setup) for s in ("finetune", "generate", "pretrain", "evaluate"))
    assert generate.generate.lora == finetune.finetune.output
    assert pretrain.pretrain.data == [generate.generate.output]
    assert evaluate.evaluate.backbone[0] == pretrain.pretrain.output
    assert len({finetune.finetune.output, generate.generate.output, pretrain.pretrain.output, evaluate.evaluate.output}) == 4
    # One model setup from end to end: the LoRA is generated with the generator it was trained on.
    assert finetune.model == generate.model and finetune.classes == generate.classes == pretrain.classes


def test_the_real_imagenet_baseline_is_trained_and_compared_like_for_like():
    from dataclasses import asdict

    lbgen_, real, vits = job("pretrain", "sd15-in1k"), job("pretrain", "sd15-in1k-real"), job("pretrain", "sd15-in1k-vits")
    same = {k: v for k, v in asdict(real.pretrain).items() if k not in ("data", "output")}
    assert same == {k: v for k, v in asdict(lbgen_.pretrain).items() if k not in ("data", "output")}  # recipe, budget, loader
    assert real.classes == lbgen_.classes and real.pretrain.data == ["/mnt/lbgen/datasets/imagenet/train"]
    assert (vits.pretrain.model, vits.pretrain.recipe, vits.pretrain.data) == ("vit_small_patch16_224", "deit", lbgen_.pretrain.data)
    transfer, classify = job("evaluate", "sd15-in1k"), job("evaluate", "sd15-in1k-classify")
    assert transfer.evaluate.backbone[:2] == [lbgen_.pretrain.output, real.pretrain.output]  # no timm:resnet50 of another recipe
    assert classify.evaluate.protocol == "classify" and classify.evaluate.backbone == [lbgen_.pretrain.output, real.pretrain.output]


def test_in1k_jobs_write_to_shared_storage_and_ask_for_gpus():
    from lbgen.runtime.storage import is_uri

    # The shards go to the object store; the stages that keep local directories write to the file
    # system cluster.yaml mounts on every node (tests/test_cluster.py), never to a node's own disk.
    shards = [job("generate", "sd15-in1k").generate.output, *job("pretrain", "sd15-in1k").pretrain.data]
    assert all(out.startswith("s3://your-bucket/lbgen/") for out in shards)
    local = [job("finetune", "sd15-in1k").finetune.output, job("pretrain", "sd15-in1k").pretrain.output,
             job("evaluate", "sd15-in1k").evaluate.output]
    assert not any(is_uri(out) for out in local)
    # The autoscaled cluster has no GPU node when a job starts: "use GPUs if the cluster has any"
    # would choose CPUs and never scale up, so every GPU stage asks for GPUs explicitly.
    assert job("finetune", "sd15-in1k").finetune.cluster.use_gpu is True
    assert job("generate", "sd15-in1k").generate.use_gpu is True
    assert job("pretrain", "sd15-in1k").pretrain.cluster.use_gpu is True
    assert job("evaluate", "sd15-in1k").evaluate.task_gpus >= 1


def test_tiny_stage_jobs_share_the_layout_of_the_tiny_run_job():
    wired = stage_configs(resolve(config_file=JOBS / "run-tiny.yaml"))
    assert wired.finetune.output == job("finetune", "tiny").finetune.output
    assert wired.generate.output == job("generate", "tiny").generate.output
    assert wired.pretrain.output == job("pretrain", "tiny").pretrain.output
    assert wired.evaluate.output == job("evaluate", "tiny").evaluate.output
    downstream = job("make-downstream", "tiny").make_downstream.output
    assert wired.evaluate.downstream == job("evaluate", "tiny").evaluate.downstream == [downstream]
    # A Ray Job runs in a fresh copy of its working dir: relative outputs would be lost with it.
    assert Path(job("finetune", "tiny").finetune.output).is_absolute()


def test_a_jobs_api_url_as_ray_address_is_one_clear_error(tmp_path, capsys):
    code = main(["generate", "--config", str(JOBS / "generate-tiny.yaml"), "--output", str(tmp_path / "gen"),
                 "--address", "http://127.0.0.1:8265"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Jobs API" in err and "http://127.0.0.1:8265" in err
    assert not (tmp_path / "gen").exists()


# ---------------------------------------------------------------- a real head and `ray job submit`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_marked(marker: bytes) -> list[int]:
    """Live processes whose environment holds `marker` (every descendant of the head inherits it)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def _stop_head(head: subprocess.Popen, marker: bytes) -> list[int]:
    """SIGTERM the head's process group, then SIGKILL whatever of it is left; returns survivors."""
    with contextlib.suppress(ProcessLookupError):  # a head that exited by itself may have left no group
        os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    # Workers and job drivers run in process groups of their own: find them by the marker.
    deadline = time.monotonic() + 15
    while (left := _processes_marked(marker)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    head.wait(timeout=5)
    return _processes_marked(marker)


def start_head() -> tuple[subprocess.Popen, str, bytes, str]:
    """A Ray head with the Jobs API on a loopback dashboard, in a process session of its own; returns the
    process, its dashboard URL, the marker its processes' environment holds and its temp dir."""
    from ray.job_submission import JobSubmissionClient

    token = f"LBGEN_TEST_RAY_HEAD={uuid.uuid4().hex}"
    # Short temp dir: Ray's unix sockets under it must stay within the 107-byte path limit.
    temp_dir = tempfile.mkdtemp(prefix="lbgen-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    # The job finds lbgen's code in its uploaded working dir (first on its PYTHONPATH), as on a cluster.
    env.update(dict([token.split("=", 1)]), RAY_AUTH_MODE="disabled",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    dashboard_port = _free_port()
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
        f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        # Ports with fixed defaults get free ones: other Ray clusters may run on this machine.
        f"--port={_free_port()}", f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    with open(Path(temp_dir) / "head.log", "w") as log:  # the head keeps its own descriptor
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if head.poll() is not None:
                log_tail = (Path(temp_dir) / "head.log").read_text()[-3000:]
                raise RuntimeError(f"ray start exited with {head.returncode}:\n{log_tail}")
            try:
                JobSubmissionClient(url)
                return head, url, token.encode(), temp_dir
            except Exception:  # the dashboard is not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    except BaseException:  # a head that never came up leaves nothing behind either
        _stop_head(head, token.encode())
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def submitted_generate_job(root: Path) -> dict:
    """Scenario `ray-job-submit` (tests/scenarios.py): the command of jobs/README.md, made small (2 images
    x 10 classes, 2 shards, no LoRA), submitted to a head of its own, which is then stopped. Returns the
    job's status and log tail, whether its driver registered with the head, the output and any process
    of the head left alive."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    head, url, marker, temp_dir = start_head()
    output = root / "generate"
    try:
        client = JobSubmissionClient(url)
        job_id = client.submit_job(
            entrypoint=f"lbgen generate --config jobs/generate-tiny.yaml --lora none --images-per-class 2 "
                       f"--rows-per-shard 10 --output {output}",
            runtime_env={"working_dir": str(REPO)},
        )
        deadline = time.monotonic() + 300
        while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
            time.sleep(2)
        record = {"succeeded": status == JobStatus.SUCCEEDED, "status": f"job {job_id} is {status}",
                  "log_tail": client.get_job_logs(job_id)[-4000:],
                  "driver_registered": client.get_job_info(job_id).driver_info is not None}
    finally:
        survivors = _stop_head(head, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
    return {**record, "output": str(output), "survivors": survivors}


SCENARIOS = {"ray-job-submit": submitted_generate_job}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="finds the head's processes through /proc")
@pytest.mark.scenario("ray-job-submit")
def test_submitted_generate_job_attaches_to_the_cluster_and_writes_shards(scenario):
    from lbgen.data.reader import inspect_dataset

    assert scenario["succeeded"], f"{scenario['status']}:\n{scenario['log_tail']}"
    # The driver registered with this head: the CLI attached through $RAY_ADDRESS instead of
    # starting a Ray of its own (whose driver the head would never see).
    assert scenario["driver_registered"]
    found = inspect_dataset(scenario["output"])
    assert found.ok, found.defects
    assert (found.summary["rows"], found.summary["shards"]) == (20, "2/2")
    assert not scenario["survivors"], f"processes of the test's Ray head still alive: {scenario['survivors']}"
