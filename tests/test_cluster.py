"""`cluster.yaml`: valid for Ray's autoscaler, and shaped for lbgen's jobs (see its comments)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from lbgen.config import resolve

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def workers(cluster: dict) -> dict:
    return {name: t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]}


def is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def in1k(stage: str):
    return resolve(config_file=REPO / "jobs" / f"{stage}-sd15-in1k.yaml")


def image_ray_version(cluster: dict) -> str:
    """`rayproject/ray:2.60.0-py311-gpu` -> "2.60.0"."""
    return cluster["docker"]["image"].split(":")[1].split("-")[0]


def shared_mount(cluster: dict) -> str:
    """The host path initialization_commands mount the EFS file system on (`... host:/ /mnt/lbgen`)."""
    mounts = [m.group(1) for cmd in cluster["initialization_commands"]
              if (m := re.search(r"mount -t nfs4 .*?\S+:\S*\s+(/[^\s)]+)", cmd))]
    assert len(mounts) == 1, cluster["initialization_commands"]
    return mounts[0]


def container_env(cluster: dict) -> dict[str, str]:
    """The `-e NAME=VALUE` of docker.run_options: the environment of every process in the container."""
    tokens = [t for option in cluster["docker"]["run_options"] for t in shlex.split(option)]
    return dict(tokens[i + 1].split("=", 1) for i, t in enumerate(tokens) if t == "-e")


def test_ray_accepts_it_as_ray_up_does(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # `ray up` fills in the AWS defaults, then validates against ray-schema.json and the node types.
    validate_config(prepare_config(cluster))


def test_workers_scale_from_zero_and_idle_nodes_go(cluster):
    assert all(t["min_workers"] == 0 for t in workers(cluster).values())
    assert 0 < cluster["idle_timeout_minutes"] <= 30
    assert cluster["max_workers"] == sum(t["max_workers"] for t in workers(cluster).values())
    assert cluster["provider"]["cache_stopped_nodes"] is False


def test_head_has_no_gpu_and_takes_no_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    assert not is_spot(head)


def test_generation_runs_on_single_gpu_spot_nodes_and_training_on_on_demand_a100s(cluster):
    types = workers(cluster)
    assert all(t["resources"]["GPU"] >= 1 for t in types.values())
    generation = [t for t in types.values() if is_spot(t)]
    assert len(generation) >= 2 and all(t["resources"]["GPU"] == 1 for t in generation)
    # The training jobs' accelerator type exists on on-demand nodes only, with enough GPUs and CPUs
    # for all of their workers on one node.
    for job in (in1k("finetune").finetune.cluster, in1k("pretrain").pretrain.cluster):
        resource = f"accelerator_type:{job.accelerator_type}"
        hosts = [t for t in types.values() if resource in t["resources"]]
        assert hosts and not any(is_spot(t) for t in hosts)
        for host in hosts:
            assert host["resources"]["GPU"] >= job.workers
            assert host["resources"]["CPU"] >= job.workers * job.cpus_per_worker
    # One generation actor per spot GPU: the job's actor count fits the nodes allowed.
    assert in1k("generate").generate.workers <= sum(t["max_workers"] for t in generation)


def test_dashboard_stays_off_the_network(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    # Ray's group admits SSH and intra-cluster traffic; extra rules may open nothing but SSH.
    extra = cluster["provider"]["security_group"].get("IpPermissions", [])
    assert all(rule.get("FromPort") == rule.get("ToPort") == 22 for rule in extra)


def test_nodes_install_lbgen_with_the_ray_version_used_to_submit(cluster):
    import ray

    mounted = {remote for remote, local in cluster["file_mounts"].items() if local == "."}
    assert any("pip install" in cmd and remote in cmd for cmd in cluster["setup_commands"] for remote in mounted)
    assert image_ray_version(cluster) == ray.__version__


def test_local_directories_of_the_in1k_jobs_are_on_the_shared_mount(cluster):
    """What one job's node writes, the next job's nodes read: local paths must be the EFS mount."""
    mount = "/mnt/lbgen"
    assert any("mount -t nfs4" in cmd and mount in cmd for cmd in cluster["initialization_commands"])
    assert f"-v {mount}:{mount}" in cluster["docker"]["run_options"]
    evaluate = in1k("evaluate").evaluate
    local = [in1k("finetune").finetune.output, in1k("generate").generate.lora, in1k("pretrain").pretrain.output,
             evaluate.output, evaluate.data_root, *(d for d in evaluate.downstream if not d.startswith("torchvision:"))]
    assert all(path.startswith(mount + "/") for path in local)
    assert len(evaluate.downstream) == 8  # the paper's eight, by torchvision name under data_root


def test_nodes_install_the_pinned_versions_of_the_tested_environment(cluster):
    """Every node, a spot replacement too, gets the versions the tests ran with (scripts/make_constraints.sh)."""
    remote = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    installs = [shlex.split(cmd) for cmd in cluster["setup_commands"] if "pip install" in cmd]
    assert len(installs) == 1 and installs[0][-1] == remote and "-c" in installs[0]
    constraints = installs[0][installs[0].index("-c") + 1]
    assert constraints.startswith(remote + "/")
    path = REPO / constraints[len(remote) + 1:]
    assert path.is_file(), f"{path} is missing: run scripts/make_constraints.sh"
    text = path.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    unpinned = [line for line in lines if not re.fullmatch(r"[\w.-]+==[^=\s]+", line)]
    assert not unpinned, f"not `name==version`: {unpinned}"
    pins = dict(line.split("==") for line in lines)
    assert "lbgen" not in pins  # the package being installed, not a constraint on it
    assert pins["ray"] == image_ray_version(cluster)
    # The image's Python is the one the pins were made with (its wheels are per Python version).
    made_with = re.search(r"Python (\d+)\.(\d+)", text)
    assert made_with and "-py" + "".join(made_with.groups()) + "-" in cluster["docker"]["image"]
    tested = {name: version(name) for name in ("torch", "diffusers", "ray")}
    assert {name: pins.get(name) for name in tested} == tested, "stale pins: run scripts/make_constraints.sh"


def test_every_container_caches_the_models_on_the_shared_mount(cluster):
    """A replacement node loads SD 1.5, CLIP and the IQA weights from EFS instead of downloading them again."""
    mount, env = shared_mount(cluster), container_env(cluster)
    assert f"-v {mount}:{mount}" in cluster["docker"]["run_options"]
    assert {"HF_HOME", "TORCH_HOME"} <= env.keys()
    assert all(env[name].startswith(mount + "/") for name in ("HF_HOME", "TORCH_HOME")), env
    # ...and they are the variables the loaders read: the HF hub's cache (diffusers, transformers,
    # open_clip, timm) and torch hub's directory (pyiqa's $TORCH_HOME/hub/pyiqa, torchvision's weights).
    probe = ("import huggingface_hub.constants as hf, torch.hub\n"
             "print(hf.HF_HUB_CACHE); print(torch.hub.get_dir())")
    caches = {name: env[name] for name in ("HF_HOME", "TORCH_HOME")}
    hub_cache, torch_hub = subprocess.run([sys.executable, "-c", probe], env=caches,
                                          capture_output=True, text=True, check=True).stdout.split()
    assert hub_cache.startswith(env["HF_HOME"] + "/") and torch_hub.startswith(env["TORCH_HOME"] + "/")


def test_every_node_type_has_an_instance_profile(cluster):
    """Workers write shards and the head's driver the manifest to S3; a head without a profile gets Ray's default."""
    arn = re.compile(r"arn:aws:iam::[^:]+:instance-profile/[\w+=,.@-]+")
    profiles = {name: t["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
                for name, t in cluster["available_node_types"].items()}
    assert all(arn.fullmatch(p) for p in profiles.values()), profiles
    # The head's own profile carries the autoscaler's EC2 rights (see cluster.yaml); the workers need S3 only.
    assert len({profiles[name] for name in workers(cluster)}) == 1


def test_in1k_jobs_wait_for_a_gpu_node_to_boot(cluster):
    """Every GPU job's resource_wait_s covers the boot time cluster.yaml states, or it fails as its nodes come up."""
    text = (REPO / "cluster.yaml").read_text()
    stated = re.search(r"^# Boot time of a GPU worker.*?~(\d+) minutes", text, re.DOTALL | re.MULTILINE)
    assert stated
    for path in sorted((REPO / "jobs").glob("*sd15*.yaml")):
        assert resolve(config_file=path).resource_wait_s >= 60 * int(stated.group(1)), path.name
