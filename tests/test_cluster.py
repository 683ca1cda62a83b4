"""`cluster.yaml`: valid for Ray's autoscaler, and shaped for lbgen's jobs (see its comments)."""

from __future__ import annotations

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
    assert cluster["docker"]["image"].split(":")[1].startswith(ray.__version__ + "-")


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
