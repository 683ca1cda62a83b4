"""lbgen.runtime.locks: one writer per output; a killed holder's lock is stale, said so, and taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

import pyarrow.fs as pafs
import pytest

from lbgen.runtime.storage import Location, locate
from lbgen.errors import OutputInUseError
from lbgen.runtime.locks import LOCK_FILE, ObjectStoreLock, OutputLock, check_free, lock_output
from lbgen.runtime.outputs import check_output_dir

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


# ---------------------------------------------------------------- S3 outputs (moto's server: conftest's `s3`)


@pytest.fixture
def s3_out(s3) -> str:
    """An S3 output URI of its own for each test."""
    return s3(f"locks/{uuid.uuid4().hex[:8]}/out")


def plant(uri: str, **holder) -> None:
    """A lock object as another run left it (written through pyarrow, not through the lock under test)."""
    (locate(uri) / LOCK_FILE).write_text(json.dumps(holder))


def plant_expired(uri: str) -> None:
    """The lock of a run killed 100 s ago, whose 60 s lease ran out 40 s ago."""
    gone = time.time() - 100
    plant(uri, command="lbgen generate --output x", pid=4242, host="gone-host", started=gone, renewed=gone, lease=60)


def lock_body(uri: str) -> dict | None:
    where = locate(uri) / LOCK_FILE
    return json.loads(where.read_text()) if where.exists() else None


def test_a_held_s3_output_is_refused_naming_the_holder(s3_out):
    with ObjectStoreLock(locate(s3_out), "lbgen generate --output x", lease=5):
        held = lock_body(s3_out)
        refusals = (lambda: lock_output(s3_out), lambda: check_free(s3_out),
                    lambda: check_output_dir(s3_out, "generate.output"))  # the stage, and its pre-flights
        for attempt in refusals:
            with pytest.raises(OutputInUseError) as err:
                attempt()
            message = str(err.value)
            assert "\n" not in message and f"pid {os.getpid()}" in message and "`lbgen generate --output x`" in message
            assert message.startswith(f"{locate(s3_out)} is in use by") and "lease runs out at" in message
        assert lock_body(s3_out)["token"] == held["token"]  # the refused runs left the holder's lock alone


def test_an_expired_s3_lock_is_said_and_taken_over(s3_out, caplog):
    plant_expired(s3_out)
    with caplog.at_level(logging.WARNING, logger="lbgen.runtime.locks"):
        check_free(s3_out)  # the pre-flight says so ...
        with ObjectStoreLock(locate(s3_out), "lbgen generate again", lease=5) as lock:  # ... and the stage takes it
            assert lock.stale["pid"] == 4242
            assert lock_body(s3_out)["command"] == "lbgen generate again"
    said = [r.message for r in caplog.records if r.name == "lbgen.runtime.locks"]
    assert [m.count("is stale (its lease ran out at") for m in said] == [1, 1]


def test_of_two_runs_taking_over_one_expired_s3_lock_exactly_one_wins(s3_out, monkeypatch):
    """Both read the expired lock before either writes; the second run writes first and wins, and the
    first run's takeover, conditional on the expired lock's ETag, fails: it is refused, naming the winner.
    (Ordered, not raced with threads: moto checks a condition and writes without a lock, S3 atomically.)"""
    plant_expired(s3_out)
    read = ObjectStoreLock.current
    second = []

    def read_while_another_run_takes_over(self):
        found = read(self)
        if not second:
            second.append(ObjectStoreLock(locate(s3_out), "the second run", lease=5))
            second[0].acquire()
        return found

    monkeypatch.setattr(ObjectStoreLock, "current", read_while_another_run_takes_over)
    with pytest.raises(OutputInUseError, match="in use by `the second run`"):
        ObjectStoreLock(locate(s3_out), "the first run", lease=5).acquire()
    assert second[0].stale["pid"] == 4242 and lock_body(s3_out)["command"] == "the second run"
    second[0].release()


def test_the_heartbeat_keeps_a_held_s3_lock_live_beyond_its_lease(s3_out):
    # A 4 s lease (renewed every 1.3 s): a beat delayed by a loaded host (1.5 s once failed under a pip install)
    # must not read as a stale lock.
    with ObjectStoreLock(locate(s3_out), "a long run", lease=4):
        time.sleep(8)  # two leases
        with pytest.raises(OutputInUseError, match="`a long run`"):
            ObjectStoreLock(locate(s3_out), lease=4).acquire()
        assert time.time() - lock_body(s3_out)["renewed"] < 4


def test_a_run_that_lost_its_s3_lock_says_so_and_leaves_the_new_holders_lock(s3_out, caplog):
    with (caplog.at_level(logging.ERROR, logger="lbgen.runtime.locks"),
          ObjectStoreLock(locate(s3_out), "a stalled run", lease=0.6)):
        # As if this run had stalled past its lease and another had taken the lock over.
        plant(s3_out, command="the run that took over", pid=4343, host="h", started=time.time(),
              renewed=time.time(), lease=60)
        time.sleep(0.6)  # the next beat (every 0.2 s) finds that the lock is no longer this run's
    assert sum("lost its lock to `the run that took over`" in r.message for r in caplog.records) == 1
    assert lock_body(s3_out)["command"] == "the run that took over"


def test_a_clean_end_removes_the_s3_lock(s3_out):
    with ObjectStoreLock(locate(s3_out), lease=5):
        assert lock_body(s3_out) is not None
    assert lock_body(s3_out) is None
    with ObjectStoreLock(locate(s3_out), lease=5) as again:
        assert again.stale is None


def test_lock_output_locks_local_and_s3_outputs_and_warns_on_others(s3_out, tmp_path, caplog):
    for where, kind in ((tmp_path / "out", OutputLock), (s3_out, ObjectStoreLock)):
        lock = lock_output(where)
        assert isinstance(lock, kind)
        lock.release()
    elsewhere = Location(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "x")  # stands for gs://
    with caplog.at_level(logging.WARNING, logger="lbgen.runtime.locks"):
        assert lock_output(elsewhere) is None
    assert "not locked" in caplog.text and "one writer per output is up to you" in caplog.text


def test_an_open_dataset_writer_holds_its_s3_output(s3_out):
    from lbgen.data.writer import DatasetPlan, DatasetWriter

    plan = DatasetPlan(content={"seed": 0}, label_names=["cat"], images_per_class=1, shard_rows=[1],
                       generator="test", description="one image", row_group_rows=1)
    with DatasetWriter.open(s3_out, plan, config={}, run={}), pytest.raises(OutputInUseError):
        check_free(s3_out)
    assert lock_body(s3_out) is None
