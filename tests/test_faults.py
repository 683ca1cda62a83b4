"""The test-only fault injection itself: it kills the process once, then never again; off by default.

The stages surviving it are tested beside them: tests/test_generate.py (a generation actor dies
mid-batch) and tests/test_finetune.py (a training worker dies mid-run).
"""

import subprocess
import sys
from pathlib import Path

import pytest

from lbgen.config import Config, ConfigError, resolve

REPO = Path(__file__).resolve().parents[1]


def visit(point: str, times: int, after: int, marker: Path) -> subprocess.CompletedProcess:
    """A fresh process reaching `point` `times` times under a fault at `finetune.step`; prints how far it got."""
    code = (
        "from lbgen.config import FaultConfig\n"
        "from lbgen.runtime.faults import maybe_die\n"
        f"fault = FaultConfig(point='finetune.step', after={after}, marker={str(marker)!r})\n"
        f"for i in range({times}):\n"
        f"    maybe_die(fault, {point!r})\n"
        "    print(i + 1, flush=True)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=False)


def test_fault_kills_at_the_nth_visit_once_over_all_processes(tmp_path):
    marker = tmp_path / "died"
    first = visit("finetune.step", 4, after=3, marker=marker)
    assert (first.returncode, first.stdout.split()) == (1, ["1", "2"]) and marker.exists()
    restarted = visit("finetune.step", 4, after=3, marker=marker)  # a restarted worker finds the marker
    assert (restarted.returncode, restarted.stdout.split()) == (0, ["1", "2", "3", "4"])


def test_fault_fires_only_at_its_own_point(tmp_path):
    other = visit("generate.batch", 3, after=1, marker=tmp_path / "died")
    assert (other.returncode, other.stdout.split()) == (0, ["1", "2", "3"]) and not (tmp_path / "died").exists()


def test_faults_are_off_by_default_and_validated():
    assert Config().fault.point is None and resolve("tiny").fault.point is None
    for fault, message in [({"point": "nowhere", "marker": "m"}, "fault.point must be one of"),
                           ({"point": "finetune.step", "after": 0, "marker": "m"}, "fault.after must be > 0"),
                           ({"point": "finetune.step"}, "fault.marker must name")]:
        with pytest.raises(ConfigError, match=message):
            resolve("tiny", overrides={"fault": fault})
