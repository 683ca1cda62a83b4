"""Scale-out on a simulated multi-node GPU cluster (tests/sim_cluster.py): a killed node loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rows import assert_same_dataset

from lbgen.data.reader import inspect_dataset

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


def run_scenario(name: str, tmp_path: Path) -> dict:
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(HERE / "sim_cluster.py"), name, str(result)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())


def test_a_worker_node_killed_mid_generation_loses_nothing(tmp_path):
    found = run_scenario("generate-node-loss", tmp_path)
    whole, cut = found["uninterrupted"], found["node_killed"]
    assert cut["nodes_before"] == 4 and cut["nodes_after"] == 3 and cut["shards_before_kill"] >= 1
    assert whole["rows"] == cut["rows"] == 48
    assert_same_dataset(Path(whole["output"]), Path(cut["output"]))  # same rows, same image bytes
    assert inspect_dataset(cut["output"]).ok
    print(f"node loss: {json.dumps(found)}")
