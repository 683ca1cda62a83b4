"""Test helper: a simulated multi-node GPU cluster on this machine, and the scenarios run inside it.

Each node is its own raylet (`ray.cluster_utils.Cluster`) declaring "GPUs" that Ray schedules like real
ones; the `sleep:<ms>` generator stands in for the GPU model. A scenario (tests/scenarios.py runs it in
its own process) starts its cluster, attaches, and stops exactly what it started, apart from any Ray
the calling test session runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

# "GPU" time of one UNet call in the node-loss scenario.
DELAY_MS = 2000
# A hard-killed node is declared dead after about 3 s (Ray's default is about 15 s).
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


@contextmanager
def simulated_cluster(workers: int = 3, gpus_per_node: int = 2, cpus_per_node: float = 1, resources: dict | None = None,
                      node_env: dict[int, dict[str, str]] | None = None):
    """A head (no GPU) plus `workers` nodes with `gpus_per_node` GPUs each; yields (cluster, worker nodes).
    `node_env`: environment variables of worker node i's processes (a slower simulated GPU, say)."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # an empty value would make Ray refuse the declared GPUs
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "_system_config": FAST_NODE_DEATH})
    try:
        nodes = [cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node, resources=resources or {},
                                  env_vars=(node_env or {}).get(i))
                 for i in range(workers)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def generate_config(table: Path, output: Path, delay_ms: int):
    from lbgen.config import resolve

    return resolve("tiny", overrides={
        "classes": str(table),
        "model": {"generator": f"sleep:{delay_ms}"},
        "generate": {"output": str(output), "use_gpu": True, "workers": 4, "images_per_class": 8, "rows_per_shard": 8,
                     "batch_size": 2, "micro_batch": 2, "steps": 2, "image_format": "png"},
    })


def kill_once_written(cluster, pattern: Path, choose_node: Callable[[], object], record: dict, counted: str) -> threading.Thread:
    """Hard-kill the node `choose_node()` names (its raylet and every process on it) once a file matching
    `pattern` exists; `record` gets the time of the kill and, as `counted`, how many such files there were."""
    def watch():
        while not list(pattern.parent.glob(pattern.name)):
            time.sleep(0.05)
        record["killed_after_s"] = round(time.perf_counter() - record["start"], 2)
        record[counted] = len(list(pattern.parent.glob(pattern.name)))
        cluster.remove_node(choose_node(), allow_graceful=False)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


class ActorWatch:
    """Which node each live actor whose class name holds `name` is on, sampled every 0.2 s from the GCS actor
    table (the simulated head runs no dashboard, so Ray's state API is not there)."""

    def __init__(self, name: str):
        self.name, self.seen = name, {}  # actor id -> [(time, node id)] while alive
        self.latest: dict[str, str] = {}  # the last sample: actor id -> node id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def alive(self) -> dict[str, str]:
        """Actor id -> node id of the live actors now."""
        import ray._private.state

        return {actor_id: a["Address"]["NodeID"] for actor_id, a in ray._private.state.actors().items()
                if self.name in a["ActorClassName"] and a["State"] == "ALIVE"}

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.latest = self.alive()
            for actor_id, node in self.latest.items():
                self.seen.setdefault(actor_id, []).append((time.perf_counter(), node))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def generation_node(nodes, watch: ActorWatch, record: dict, wait_s: float = 60):
    """The first of `nodes` that holds a live generation actor in `watch`'s latest sample, waiting up to `wait_s`
    for one; `record` gets those actors and the time. The sample, not a query of its own: Ray's state accessor
    is one object, and a second thread querying it beside the watch's got no actors on a loaded host."""
    deadline = time.perf_counter() + wait_s
    while not (node := next((n for n in nodes if n.node_id in (alive := watch.latest).values()), None)):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no worker node held a live generation actor for {wait_s} s: {alive}")
        time.sleep(0.1)
    record["actors_on_killed_node"] = sorted(a for a, where in alive.items() if where == node.node_id)
    record["killed_node"], record["killed_at"] = node.node_id, time.perf_counter()
    return node


def replacements(watch: ActorWatch, record: dict) -> dict:
    """How the killed node's generation actors were replaced: the same actors seen alive on another node after
    the kill (Ray restarted them), and actors first seen after the kill (new ones)."""
    if "killed_at" not in record:
        raise RuntimeError("the node was never killed (see the watcher's error above)")
    killed_at, node = record.pop("killed_at"), record["killed_node"]
    restarted = sorted(a for a in record["actors_on_killed_node"]
                       if any(t > killed_at and where != node for t, where in watch.seen.get(a, ())))
    new = sorted(a for a, sightings in watch.seen.items() if sightings[0][0] > killed_at)
    return {"restarted_elsewhere": restarted, "new_actors": new}


def generate_node_loss(root: Path, timed: bool = False) -> dict:
    """A dataset made on a 3-node cluster while a worker node is killed mid-run (and, `timed`, the same
    dataset made uninterrupted first, for the time the loss cost).

    4 generation actors on 6 GPUs; each batch (2 images) takes 4 s of "GPU" time and each actor makes
    6 batches, so most of the work is still to do when the first shard (4 batches) lands and the node goes.
    Every UNet call leaves a file (`SLEEP_CALLS_ENV`): `remade_images` counts the images generated twice.
    """
    import ray

    from lbgen.models.generator import SLEEP_CALLS_ENV
    from lbgen.stages.generate import generate

    table = root / "classes.txt"
    table.write_text("".join(f"n{i:03d} class {i}\n" for i in range(6)))  # 48 images, 6 shards
    out = {"classes": str(table)}
    calls = root / "unet-calls"
    os.environ[SLEEP_CALLS_ENV] = str(calls)  # before the nodes start: their workers inherit it
    with simulated_cluster() as (cluster, nodes):
        for name, kill in ((("uninterrupted", False),) if timed else ()) + (("node_killed", True),):
            output = root / name
            shutil.rmtree(calls, ignore_errors=True)
            calls.mkdir()
            record = {"start": time.perf_counter(), "nodes_before": len([n for n in ray.nodes() if n["Alive"]])}
            with ActorWatch("MapBatches(Generate") as watch:
                watcher = kill_once_written(cluster, output / "data" / "train-*.parquet",
                                            partial(generation_node, nodes, watch, record), record,
                                            "shards_before_kill") if kill else None
                cfg = generate_config(table, output, delay_ms=DELAY_MS)
                manifest = generate(cfg, show_progress=False)
            if kill:
                record.update(replacements(watch, record))
            record["seconds"] = round(time.perf_counter() - record.pop("start"), 2)
            if watcher:
                watcher.join(timeout=1)
            if timed and kill:
                record["lost_s"] = round(record["seconds"] - out["uninterrupted"]["seconds"], 2)
            record["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
            record["rows"] = manifest["totals"]["rows"]
            gen = cfg.generate  # every batch is a full micro-batch here: `steps` UNet calls per micro_batch images
            record["unet_calls"] = len(list(calls.iterdir()))
            # In images' worth of UNet calls: a batch cut short at step 1 of 2 counts as half its images.
            record["remade_images"] = (record["unet_calls"] - record["rows"] // gen.micro_batch * gen.steps) / gen.steps * gen.micro_batch
            out[name] = {**record, "output": str(output)}
    return out


def training_node(nodes, record: dict):
    """The first of `nodes` that holds a Ray Train worker (its placement group's bundles)."""
    import ray

    used = {node for group in ray.util.placement_group_table().values() if group["state"] == "CREATED"
            for node in group["bundles_to_node_id"].values()}
    record["training_nodes"] = len(used)
    return next(n for n in nodes if n.node_id in used)


def pretrain_node_loss(root: Path) -> dict:
    """Pre-training with 2 DDP workers on 1-CPU nodes (so on 2 nodes) while the node of one is killed
    after the first checkpoint: Ray Train restarts the worker group from its last checkpoint on the
    nodes left (the head's CPU among them) and finishes."""
    import json as json_

    import ray
    from shape_shards import write_shape_shards

    from lbgen.config import resolve
    from lbgen.data.classes import load_class_table
    from lbgen.stages.pretrain import pretrain

    shards = write_shape_shards(root / "shapes", load_class_table("tiny10"), per_class=12, size=32)
    output = root / "pretrain"
    cfg = resolve("tiny", overrides={"pretrain": {
        "data": [str(shards)], "output": str(output), "epochs": 3, "batch_size": 8,
        "cluster": {"workers": 2, "cpus_per_worker": 1, "use_gpu": False, "checkpoint_every": 1, "max_failures": 3}}})
    with simulated_cluster(workers=3, gpus_per_node=0, cpus_per_node=1) as (cluster, nodes):
        record = {"start": time.perf_counter(), "nodes_before": len([n for n in ray.nodes() if n["Alive"]])}
        # Once Ray Train has registered the first checkpoint (its snapshot names it): a kill while a checkpoint
        # directory is still being written rightly restarts from the one before, here from scratch.
        watcher = kill_once_written(cluster, output / "checkpoints" / "checkpoint_manager_snapshot.json",
                                    partial(training_node, nodes, record), record, "snapshots_before_kill")
        pretrain(cfg)
        record["seconds"] = round(time.perf_counter() - record.pop("start"), 2)
        watcher.join(timeout=1)
        record["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
    metrics = [json_.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    resumed = sorted({m["resumed_from_step"] for m in metrics if m["resumed_from_step"]})  # the step each restart began at
    return {"pretrain": {**record, "output": str(output), "epochs": [m["epoch"] for m in metrics],
                         "steps_per_epoch": metrics[0]["step"], "resumed_from_step": resumed,
                         "steps": metrics[-1]["step"]}}


# ---------------------------------------------------------------- the autoscaler

REPO = Path(__file__).resolve().parents[1]
# cluster.yaml's node types, scaled to this machine: CPUs / 4 (GPUs and accelerator types as they are),
# max_workers / 8, the idle timeout / 20 (10 minutes -> 30 s: longer than the 20 s between the requests of
# Ray Data's autoscaling coordinator, as 10 minutes are, so that a node booted for a growing pool is still
# there when Ray Data claims it). The in1k jobs' shapes are scaled alike.
CPU_SCALE, MAX_WORKERS_SCALE, IDLE_SCALE = 4, 8, 20


def scaled_node_types(cluster_yaml: Path = REPO / "cluster.yaml") -> tuple[dict, float]:
    """cluster.yaml's worker node types for Ray's fake multi-node provider, and its idle timeout in minutes."""
    import yaml

    spec = yaml.safe_load(cluster_yaml.read_text())
    types = {}
    for name, node in spec["available_node_types"].items():
        if name == spec["head_node_type"]:
            continue
        resources = dict(node["resources"])
        resources["CPU"] = max(1, resources["CPU"] // CPU_SCALE)
        types[name] = {"resources": resources, "node_config": {}, "min_workers": node.get("min_workers", 0),
                       "max_workers": max(1, node["max_workers"] // MAX_WORKERS_SCALE)}
    return types, spec["idle_timeout_minutes"] / IDLE_SCALE


@contextmanager
def autoscaling_cluster(node_types: dict, idle_timeout_minutes: float, port: int):
    """A head with no CPU (as cluster.yaml's) whose autoscaler launches `node_types` as local raylets
    (Ray's fake multi-node provider, through its `external` provider path: the wheel lacks the
    provider's default YAML). Stops exactly its own processes: the head's, and those of the nodes
    the autoscaler launched, which share the head's session directory."""
    import psutil
    import ray
    import yaml
    from ray.cluster_utils import Cluster

    config = {
        "cluster_name": "lbgen-fake", "max_workers": sum(t["max_workers"] for t in node_types.values()),
        "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes, "head_node_type": "ray.head.default",
        "provider": {"type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": f"127.0.0.1:{port}", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {**node_types, "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lbgen-autoscaler-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    os.environ.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})  # read by the monitor
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "gcs_server_port": port, "autoscaling_config": str(path),
        "_system_config": FAST_NODE_DEATH})
    session = Path(cluster.head_node.get_session_dir_path()).name
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for proc in psutil.process_iter(["cmdline"]):
            if any(session in part for part in proc.info["cmdline"] or ()):
                proc.kill()
        path.unlink(missing_ok=True)


def node_groups() -> dict[str, str]:
    """Node id -> node type, of the live nodes the autoscaler launched. The fake provider hands each
    node's type and id to its raylet's environment (not to its labels, which Ray reads from the
    launching process's own environment), so they are read there."""
    import psutil
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    groups = {}
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "raylet":
            continue
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        node = env.get("RAY_OVERRIDE_NODE_ID_FOR_TESTING")
        if node in alive and "RAY_NODE_TYPE_NAME" in env:
            groups[node] = env["RAY_NODE_TYPE_NAME"]
    return groups


def wait_for(condition, timeout: float) -> float:
    """Seconds until `condition()` held (polled each 0.5 s); raises TimeoutError after `timeout`."""
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(0.5)
    return round(time.perf_counter() - start, 2)


def record_node(config: dict) -> None:
    """A training loop that only says where it runs: this worker's node type, one file per rank."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    node, group = ray.get_runtime_context().get_node_id(), os.environ.get("RAY_NODE_TYPE_NAME")  # from the raylet
    (Path(config["out"]) / f"rank{rank}.json").write_text(json.dumps({"node": node, "type": group}))
    ray.train.report({"step": 1})


@contextmanager
def gloo_on_simulated_gpus():
    """Ray Train picks NCCL when workers hold GPUs, and NCCL needs real ones: the simulated GPUs get gloo."""
    import ray.train.torch
    from ray.train.torch import TorchConfig

    original = ray.train.torch.TorchTrainer

    class GlooTrainer(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, torch_config=TorchConfig(backend="gloo"), **kwargs)

    ray.train.torch.TorchTrainer = GlooTrainer
    try:
        yield
    finally:
        ray.train.torch.TorchTrainer = original


def training_on_autoscaler(cfg, stage: str, root: Path) -> list[str]:
    """lbgen's Ray Train driver for `stage` with `record_node` as the loop: the node type of each worker."""
    from lbgen.runtime import training

    out = root / f"{stage}-workers"
    out.mkdir(parents=True)
    with gloo_on_simulated_gpus():
        training.fit(record_node, {"out": str(out)}, cfg, stage, contextlib.nullcontext())
    return [json.loads(p.read_text())["type"] for p in sorted(out.glob("rank*.json"))]


@contextmanager
def gpu_timeline(every_s: float = 0.5):
    """Samples, while the block runs, of (seconds, GPUs in the cluster, GPUs held): with one generation actor
    per GPU, what the pool has grown to as the autoscaler's nodes came up."""
    import ray

    samples, stop, start = [], threading.Event(), time.perf_counter()

    def sample() -> None:
        while not stop.wait(every_s):
            total, free = ray.cluster_resources().get("GPU", 0), ray.available_resources().get("GPU", 0)
            samples.append((round(time.perf_counter() - start, 1), total, total - free))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def autoscaler(root: Path) -> dict:
    """Each stage with the in1k jobs' resource shapes, scaled, on an autoscaling cluster that starts with
    no worker node: which node types the autoscaler launches, that they go back once idle, and that a
    request no node type can satisfy is refused after the bounded wait."""
    import socket

    from lbgen.config import resolve
    from lbgen.runtime.resources import ResourceError
    from lbgen.stages.generate import generate

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    types, idle_minutes = scaled_node_types()
    out: dict = {"node_types": types, "idle_timeout_s": idle_minutes * 60}
    table = root / "classes.txt"
    table.write_text("".join(f"n{i:03d} class {i}\n" for i in range(4)))
    # The in1k jobs' shapes, scaled as the node types are: generate-sd15-in1k's 16 GPU workers of 1 CPU
    # -> 2 (the gpu-gen types' max_workers / 8); finetune/pretrain-sd15-in1k's 8 A100 workers of 4 CPUs
    # -> 2 of 1 CPU (CPUs / 4: they fit the scaled A100 node, as 8 fit a p4d).
    generation = {"use_gpu": True, "workers": 16 // MAX_WORKERS_SCALE, "cpus_per_worker": 1.0, "images_per_class": 2,
                  "rows_per_shard": 2, "batch_size": 2, "micro_batch": 2, "steps": 1}
    training_cluster = {"workers": 8 // CPU_SCALE, "use_gpu": True, "accelerator_type": "A100", "cpus_per_worker": 4 / CPU_SCALE}
    with autoscaling_cluster(types, idle_minutes, port):
        out["worker_nodes_at_start"] = len(node_groups())
        cfg = resolve("tiny", overrides={"classes": str(table), "model": {"generator": "sleep:100"}, "resource_wait_s": 120,
                                         "generate": {**generation, "output": str(root / "generate")}})
        manifest = generate(cfg, show_progress=False)
        out["generate"] = {"rows": manifest["totals"]["rows"], "node_types": sorted(node_groups().values())}
        out["generate"]["scaled_down_after_s"] = wait_for(lambda: not node_groups(), 120)
        # A pool that starts at one actor and grows to four as the GPU nodes boot (both spot types: 2 + 2). Ray Data
        # grows an actor pool 20-25 s after the GPUs arrive (idle host), so the work must outlast that with one actor
        # even when the nodes boot late on a loaded host: 320 rows, 64 s of model time for one actor (160 rows
        # once finished with two actors, in a suite run that took 22 minutes).
        cfg = resolve("tiny", overrides={"classes": str(table), "model": {"generator": "sleep:400"}, "resource_wait_s": 120,
                                         "generate": {**generation, "workers": 4, "min_workers": 1, "images_per_class": 80,
                                                      "rows_per_shard": 8, "output": str(root / "grow")}})
        with gpu_timeline() as timeline:
            manifest = generate(cfg, show_progress=False)
        out["pool_growth"] = {"rows": manifest["totals"]["rows"], "timeline": timeline}
        out["pool_growth"]["scaled_down_after_s"] = wait_for(lambda: not node_groups(), 120)
        for stage in ("finetune", "pretrain"):
            cfg = resolve("tiny", overrides={"resource_wait_s": 120, stage: {"output": str(root / stage), "cluster": training_cluster}})
            out[stage] = {"worker_node_types": training_on_autoscaler(cfg, stage, root), "node_types": sorted(node_groups().values())}
        out["training_scaled_down_after_s"] = wait_for(lambda: not node_groups(), 120)
        refused = {}  # 32 CPUs: more than any node type has (a pool that could start on one node would start)
        for name, overrides in {
            "generate, 32 CPUs per actor": {"generate": {**generation, "cpus_per_worker": 32.0, "output": str(root / "never")}},
            "finetune on H100": {"finetune": {"output": str(root / "never-ft"), "cluster": {**training_cluster, "accelerator_type": "H100"}}},
        }.items():
            cfg = resolve("tiny", overrides={"classes": str(table), "model": {"generator": "sleep:100"}, "resource_wait_s": 5, **overrides})
            start = time.perf_counter()
            try:
                generate(cfg, show_progress=False) if "generate" in overrides else training_on_autoscaler(cfg, "finetune", root / "h100")
            except ResourceError as err:
                refused[name] = {"message": str(err), "after_s": round(time.perf_counter() - start, 2)}
        out["refused"] = refused
    return out


SCENARIOS = {"generate-node-loss": generate_node_loss, "generate-node-loss-timed": partial(generate_node_loss, timed=True),
             "pretrain-node-loss": pretrain_node_loss, "autoscaler": autoscaler}
