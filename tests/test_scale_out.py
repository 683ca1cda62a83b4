"""Scale-out on a simulated multi-node GPU cluster (tests/sim_cluster.py): a killed node loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rows import read_rows
from sim_cluster import generate_config

from lbgen.data.reader import inspect_dataset
from lbgen.stages.generate import GENERATION_TASKS_IN_FLIGHT

pytestmark = pytest.mark.slow


def expected_rows(classes: str) -> dict:
    """(label, index) -> (pixels, image bytes) made in this process by generate's own callables, with the
    stand-in's delay at 0 (it waits, it does not change a pixel)."""
    import dataclasses

    import numpy as np

    from lbgen.data.classes import load_class_table
    from lbgen.data.images import encode_images
    from lbgen.data.plan import plan
    from lbgen.stages.generate import GenerateBatch

    cfg = generate_config(Path(classes), Path("unused"), delay_ms=0)
    rows = plan(load_class_table(classes), cfg)
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    made = GenerateBatch(dataclasses.asdict(cfg))(batch)
    encoded = encode_images(dict(made), cfg.generate.image_format, cfg.generate.image_quality)
    return {(int(l), int(i)): (p, b) for l, i, p, b in zip(batch["label"], batch["index"], made["pixels"], encoded["image_bytes"])}


@pytest.mark.scenario("generate-node-loss")
def test_a_worker_node_killed_mid_generation_loses_nothing(scenario):
    found = scenario
    cut = found["node_killed"]
    assert cut["nodes_before"] == 4 and cut["nodes_after"] == 3 and 1 <= cut["shards_before_kill"] < 6
    assert cut["actors_on_killed_node"], "the killed node held no generation actor"
    # A batch is the unit of work: the lost node re-makes at most its actors' in-flight batches, not their shards.
    assert 0 <= cut["remade_images"] <= len(cut["actors_on_killed_node"]) * GENERATION_TASKS_IN_FLIGHT * 2, cut
    assert cut["restarted_elsewhere"] or cut["new_actors"], "no generation actor replaced the lost ones"
    assert inspect_dataset(cut["output"]).ok  # every shard whole and listed, every (label, index) once
    rows, expected = read_rows(Path(cut["output"])), expected_rows(found["classes"])
    assert rows.keys() == expected.keys() and len(rows) == 48
    for key, (pixels, image) in expected.items():  # the images of an uninterrupted run, bit for bit
        assert (rows[key]["pixels"] == pixels).all() and rows[key]["image"]["bytes"] == image, key
    print(f"node loss: {json.dumps(found)}")


@pytest.mark.scenario("pretrain-node-loss")
def test_pretrain_across_two_nodes_survives_the_loss_of_one(scenario):
    found = scenario["pretrain"]
    assert found["nodes_before"] == 4 and found["nodes_after"] == 3
    assert found["training_nodes"] == 2  # one DDP worker per 1-CPU node
    # Every epoch logged once, and the run after the kill started from a checkpoint, not from scratch.
    assert found["epochs"] == [1, 2, 3] and found["steps"] == 3 * found["steps_per_epoch"]
    assert len(found["resumed_from_step"]) == 1 and found["resumed_from_step"][0] >= found["steps_per_epoch"]
    meta = json.loads((Path(found["output"]) / "model.json").read_text())
    assert meta["steps"] == found["steps"]  # the exported backbone is the finished one
    print(f"pretrain node loss: {json.dumps(found)}")


@pytest.mark.scenario("autoscaler")
def test_the_autoscaler_launches_each_stage_its_node_type_from_zero_and_takes_them_back(scenario):
    found = scenario
    generation_types = {"gpu-gen-g5", "gpu-gen-g6"}
    assert set(found["node_types"]) == generation_types | {"gpu-train-a100"}  # cluster.yaml's own
    assert found["worker_nodes_at_start"] == 0
    # Generation on the single-GPU spot types only, never on the A100 type; training the reverse.
    assert found["generate"]["rows"] == 8 and found["generate"]["node_types"]
    assert set(found["generate"]["node_types"]) <= generation_types
    for stage in ("finetune", "pretrain"):
        assert found[stage]["worker_node_types"] == ["gpu-train-a100"] * 2, found[stage]
    # The generation pool grew from one actor to four as the nodes came up (ray #59144: GPU pools stuck at one).
    timeline, held = found["pool_growth"]["timeline"], [held for _, _, held in found["pool_growth"]["timeline"]]
    assert found["pool_growth"]["rows"] == 320
    assert any(held >= 1 and gpus < 4 for _, gpus, held in timeline), timeline  # started before the last node came up
    assert max(held) == 4, timeline
    # Idle nodes went back (cluster.yaml's 10-minute idle timeout, scaled to 30 s).
    assert found["generate"]["scaled_down_after_s"] < 90 and found["training_scaled_down_after_s"] < 90
    # Requests no node type can satisfy: refused after the bounded wait (5 s here), naming the settings.
    refused = found["refused"]
    assert set(refused) == {"generate, 32 CPUs per actor", "finetune on H100"}, refused
    assert "generate.cpus_per_worker (--cpus-per-worker)" in refused["generate, 32 CPUs per actor"]["message"]
    assert "accelerator_type:H100" in refused["finetune on H100"]["message"]
    assert all(5 <= r["after_s"] < 60 for r in refused.values())
    print(f"autoscaler: {json.dumps(found)}")
