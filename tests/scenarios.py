"""Test helper: scenarios, the long end-to-end runs that tests read, run in the background.

A scenario is a function of an output directory that returns a JSON-able record: a simulated cluster
losing a node (tests/sim_cluster.py), a fine-tuning stopped, resumed and killed, a killed `lbgen run`
re-run, `lbgen generate` killed three times and resumed, a `ray job submit` to a head of its own. The
tests that read one are marked `@pytest.mark.scenario(NAME)`; conftest starts the scenarios they need as
soon as collection ends, one after another, each in its own process with its own Ray, and runs their
readers last. Their waits (stand-in GPUs, node deaths, Ray start-ups) then overlap other tests
instead of adding to them.

    python tests/scenarios.py SCENARIO OUT.json
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# Scenario -> the test module whose `SCENARIOS` (name -> function of the output directory) holds it.
PROVIDERS = {
    "generate-node-loss": "sim_cluster",
    "generate-node-loss-timed": "sim_cluster",
    "pretrain-node-loss": "sim_cluster",
    "autoscaler": "sim_cluster",
    "finetune-resume": "test_finetune",
    "run-killed-then-completed": "test_run",
    "ray-job-submit": "test_jobs",
    "generate-driver-kills": "test_generate",
}


def scenario_function(name: str):
    return importlib.import_module(PROVIDERS[name]).SCENARIOS[name]


@contextmanager
def local_ray():
    """A new local Ray of 2 CPUs (the test session's `ray_local`, a scenario's own): "local", never a
    cluster that another process of the session started and left to be found."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


class Scenarios:
    """Scenarios run one after another, each in its own process, in a background thread; `result(name)`
    waits for one. Each process gets its own Ray temp dir: a cluster it starts is then never the one a
    plain `ray.init()` elsewhere in the session finds and attaches to."""

    def __init__(self, names: list[str], timeout_s: float = 900):
        self.root = Path(tempfile.mkdtemp(prefix="lbsim"))
        self.timeout_s = timeout_s
        self.done = {name: threading.Event() for name in names}
        self.errors: dict[str, str] = {}
        self.seconds: dict[str, int] = {}  # wall time of each scenario run, for the session's summary
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        threading.Thread(target=self._run_all, daemon=True).start()

    def _run_all(self) -> None:
        for name, done in self.done.items():
            if not self.stopping:
                self._run(name)
            done.set()

    def _run(self, name: str) -> None:
        out = self.root / name
        out.mkdir()
        # Short: Ray's socket paths (at most 107 bytes) lie under it. The tests directory on the path:
        # Ray workers may run functions of the test modules.
        env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(dir=self.root, prefix=""),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
        started = time.perf_counter()
        with open(out / "log.txt", "w") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, name, str(out / "result.json")], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
            try:
                code = self.proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                self._stop(self.proc)
                code = f"timeout after {self.timeout_s:.0f} s"
        self.seconds[name] = round(time.perf_counter() - started)
        if code != 0:
            self.errors[name] = f"{name} exited {code}:\n" + (out / "log.txt").read_text()[-3000:]

    def result(self, name: str) -> dict:
        """The scenario's result, once it has finished; AssertionError with its log's tail if it failed."""
        if not self.done[name].wait(self.timeout_s * len(self.done)):
            raise AssertionError(f"scenario {name} never finished")
        assert name not in self.errors, self.errors[name]
        return json.loads((self.root / name / "result.json").read_text())

    def close(self) -> None:
        """Stop a scenario still running (its Ray shut down by its own clean-up) and delete the outputs."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self._stop(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt: the scenario's `finally` stops its Ray
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    scenario, result = sys.argv[1], Path(sys.argv[2])
    result.write_text(json.dumps(scenario_function(scenario)(result.parent), indent=1))
