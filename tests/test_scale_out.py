"""Scale-out on a simulated multi-node GPU cluster (tests/sim_cluster.py): a killed node loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rows import read_rows
from sim_cluster import generate_config

from lbgen.data.reader import inspect_dataset

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


def run_scenario(name: str, tmp_path: Path) -> dict:
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(HERE / "sim_cluster.py"), name, str(result)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())


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


def test_a_worker_node_killed_mid_generation_loses_nothing(tmp_path):
    found = run_scenario("generate-node-loss", tmp_path)
    cut = found["node_killed"]
    assert cut["nodes_before"] == 4 and cut["nodes_after"] == 3 and 1 <= cut["shards_before_kill"] < 12
    assert inspect_dataset(cut["output"]).ok  # every shard whole and listed, every (label, index) once
    rows, expected = read_rows(Path(cut["output"])), expected_rows(found["classes"])
    assert rows.keys() == expected.keys() and len(rows) == 48
    for key, (pixels, image) in expected.items():  # the images of an uninterrupted run, bit for bit
        assert (rows[key]["pixels"] == pixels).all() and rows[key]["image"]["bytes"] == image, key
    print(f"node loss: {json.dumps(found)}")
