"""Test helper: a simulated multi-node GPU cluster on this machine, and the scenarios run inside it.

Each node is its own raylet (`ray.cluster_utils.Cluster`) declaring "GPUs" that Ray schedules like real
ones; the `sleep:<ms>` generator stands in for the GPU model. A scenario runs in its own process
(`python tests/sim_cluster.py SCENARIO OUT.json`): it starts its cluster, attaches, and stops exactly
what it started, apart from any Ray the calling test session runs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

# "GPU" time of one UNet call in the node-loss scenario.
DELAY_MS = 2000
# A hard-killed node is declared dead after about 3 s (Ray's default is about 15 s).
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


@contextmanager
def simulated_cluster(workers: int = 3, gpus_per_node: int = 2, cpus_per_node: float = 1, resources: dict | None = None):
    """A head (no GPU) plus `workers` nodes with `gpus_per_node` GPUs each; yields (cluster, worker nodes)."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # an empty value would make Ray refuse the declared GPUs
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "_system_config": FAST_NODE_DEATH})
    try:
        nodes = [cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node, resources=resources or {})
                 for _ in range(workers)]
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
        "generate": {"output": str(output), "use_gpu": True, "workers": 4, "images_per_class": 8, "rows_per_shard": 4,
                     "batch_size": 2, "micro_batch": 2, "steps": 2, "image_format": "png"},
    })


def kill_after_first_shard(cluster, node, output: Path, record: dict) -> threading.Thread:
    """Hard-kill `node` (its raylet and every process on it) once `output` holds a whole shard."""
    def watch():
        while not list((output / "data").glob("train-*.parquet")):
            time.sleep(0.05)
        record["killed_after_s"] = round(time.perf_counter() - record["start"], 2)
        record["shards_before_kill"] = len(list((output / "data").glob("train-*.parquet")))
        cluster.remove_node(node, allow_graceful=False)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def generate_node_loss(root: Path, timed: bool = False) -> dict:
    """A dataset made on a 3-node cluster while a worker node is killed mid-run (and, `timed`, the same
    dataset made uninterrupted first, for the time the loss cost).

    4 generation actors on 6 GPUs; each batch (2 images) takes 4 s of "GPU" time and each actor makes
    6 batches, so most of the work is still to do when the first shard lands and the node goes.
    """
    import ray

    from lbgen.stages.generate import generate

    table = root / "classes.txt"
    table.write_text("".join(f"n{i:03d} class {i}\n" for i in range(6)))  # 48 images, 12 shards
    out = {"classes": str(table)}
    with simulated_cluster() as (cluster, nodes):
        for name, kill in ((("uninterrupted", False),) if timed else ()) + (("node_killed", True),):
            output = root / name
            record = {"start": time.perf_counter(), "nodes_before": len([n for n in ray.nodes() if n["Alive"]])}
            watcher = kill_after_first_shard(cluster, nodes[0], output, record) if kill else None
            manifest = generate(generate_config(table, output, delay_ms=DELAY_MS), show_progress=False)
            record["seconds"] = round(time.perf_counter() - record.pop("start"), 2)
            if watcher:
                watcher.join(timeout=1)
            if timed and kill:
                record["lost_s"] = round(record["seconds"] - out["uninterrupted"]["seconds"], 2)
            record["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
            record["rows"] = manifest["totals"]["rows"]
            out[name] = {**record, "output": str(output)}
    return out


SCENARIOS = {"generate-node-loss": generate_node_loss, "generate-node-loss-timed": partial(generate_node_loss, timed=True)}

if __name__ == "__main__":  # python tests/sim_cluster.py SCENARIO OUT.json
    scenario, result = sys.argv[1], Path(sys.argv[2])
    result.write_text(json.dumps(SCENARIOS[scenario](result.parent), indent=1))
