"""lbgen.runtime.locks: one writer per output; a killed holder's lock is stale, said so, and taken over."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest

from lbgen.errors import OutputInUseError
from lbgen.runtime.locks import LOCK_FILE, OutputLock, check_free

HOLD = """
import sys, time
from lbgen.runtime.locks import OutputLock
with OutputLock(sys.argv[1], "lbgen generate --output x"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding `tmp_path / "out"`, as a running `lbgen generate` does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_held_output_is_refused_naming_the_holder(tmp_path, holder):
    for attempt in (lambda: OutputLock(tmp_path / "out").acquire(), lambda: check_free(tmp_path / "out")):
        with pytest.raises(OutputInUseError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and "`lbgen generate --output x`" in message
        assert message.startswith(f"{tmp_path / 'out'} is in use by")


def test_a_killed_holder_leaves_a_stale_lock_that_is_said_and_taken(tmp_path, holder, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="lbgen.runtime.locks"):
        check_free(tmp_path / "out")  # the pre-flight says so ...
        with OutputLock(tmp_path / "out", "lbgen generate again") as lock:  # ... and the stage takes it
            assert lock.stale["pid"] == holder.pid
            assert (tmp_path / "out" / LOCK_FILE).read_text().count(f'"pid": {os.getpid()}') == 1
    assert [r.message.count("is stale") for r in caplog.records] == [1, 1]
    with OutputLock(tmp_path / "out") as again:
        assert again.stale is None  # a clean end leaves no holder behind


def test_a_second_lock_in_the_same_process_is_refused_too(tmp_path):
    with OutputLock(tmp_path / "out", "first"):
        with pytest.raises(OutputInUseError, match="`first`"):
            OutputLock(tmp_path / "out").acquire()


def test_a_clean_end_or_a_refusal_leaves_no_lock_file(tmp_path):
    with OutputLock(tmp_path / "out"):
        assert (tmp_path / "out" / LOCK_FILE).exists()
    assert list((tmp_path / "out").iterdir()) == []
    OutputLock(tmp_path / "out").acquire().release()
    assert list((tmp_path / "out").iterdir()) == []


class _Stopped(Exception):
    """Raised by the stand-in trainer once it has tried the lock: the stage stops there."""


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_a_running_training_stage_refuses_a_second_writer(stage, tmp_path, monkeypatch):
    """While the stage's trainer runs (here a stand-in for Ray Train's `fit`), its output is held: a second
    command's check and a second lock are both refused."""
    import importlib

    from shape_shards import write_shape_shards

    from lbgen.config import resolve
    from lbgen.data.classes import load_class_table
    from lbgen.runtime import training

    module = importlib.import_module(f"lbgen.stages.{stage}")
    output = tmp_path / "out"
    overrides = {stage: {"output": str(output)}}
    if stage == "pretrain":
        write_shape_shards(tmp_path / "shards", load_class_table("tiny10"), per_class=4, size=16)
        overrides["pretrain"]["data"] = [str(tmp_path / "shards")]
        monkeypatch.setattr(module, "build_dataset", lambda *args: None)  # no Ray Data: the trainer below reads nothing
    refusals = []

    def trainer_beside_a_second_writer(*args, **kwargs):
        for second_writer in (lambda: check_free(output), lambda: OutputLock(output, "a second writer").acquire()):
            with pytest.raises(OutputInUseError):
                second_writer()
            refusals.append(True)
        raise _Stopped

    monkeypatch.setattr(training, "fit", trainer_beside_a_second_writer)
    with pytest.raises(_Stopped):
        getattr(module, stage)(resolve("tiny", overrides=overrides))
    assert refusals == [True, True]
    OutputLock(output).acquire().release()  # and the stage let go of it when it stopped
