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
