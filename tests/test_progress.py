"""A stage's metrics log (lbgen.runtime.progress): each step once across resumes and restarts."""

import json

from lbgen.runtime.progress import MetricsLog


def _steps(path):
    return [json.loads(line).get("step") for line in path.read_text().splitlines()]


def test_metrics_log_keeps_each_step_once_across_a_resume_and_a_restart(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, 0)
    log.write({"phase": "warmup", "loss_d": 0.7})
    for step in (1, 2, 3):
        log.write({"step": step})
    log = MetricsLog(path, 2)  # restored from the step-2 checkpoint: step 3 is done again
    assert _steps(path) == [None, 1, 2]
    log.write({"step": 3})
    assert _steps(path) == [None, 1, 2, 3] and "time" in json.loads(path.read_text().splitlines()[-1])
    MetricsLog(path, 0)  # died before its first checkpoint: the run starts over, warm-up included
    assert path.read_text() == ""
