"""One writer per output: a running stage holds a lock on its output directory.

The lock is an advisory `flock` on `OUT/.lbgen.lock`, held by the driver for the whole stage. The
kernel drops it when the process ends, however it ends, so a killed run never blocks a re-run;
a clean end removes the file, a killed run leaves it naming the dead holder, and the next run says
that it found a stale lock and takes it. A second command on a held output is refused with one line naming the holder (host, pid,
command, start time). `flock` works on local disks and on NFSv4 (as a POSIX lock); object stores
have no lock primitive, so a dataset written to `s3://...` is not locked (see the README).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from lbgen.errors import OutputInUseError

LOCK_FILE = ".lbgen.lock"
log = logging.getLogger(__name__)


def _holder_text(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {started})"


def _report_stale(directory: str | Path, holder: dict | None) -> None:
    if holder:
        log.warning("%s: the lock left by %s is stale (that process is gone): this run takes it over",
                    directory, _holder_text(holder))


def _same_file(file, path: Path) -> bool:
    """Whether the open `file` is still what `path` names (not removed or replaced since it was opened)."""
    try:
        return os.fstat(file.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _in_use(directory: str | Path, holder: dict) -> OutputInUseError:
    return OutputInUseError(f"{directory} is in use by {_holder_text(holder)}: one writer per output; "
                            "wait for it to finish, or use another --output")


def _read_holder(file) -> dict | None:
    file.seek(0)
    text = file.read()
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return {"command": text.strip()[:80]}


class OutputLock:
    """`with OutputLock(directory, "lbgen generate"):` holds `directory` for this process, or raises
    OutputInUseError naming the process that holds it. Creates `directory` if needed."""

    def __init__(self, directory: str | Path, command: str | None = None):
        self.directory = Path(directory)
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
        self.file = None
        self.stale: dict | None = None  # the holder a killed run left behind, if any

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> OutputLock:
        """Take the lock (see the class); returns self."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        while True:
            self.file = open(path, "a+")  # noqa: SIM115  held until release
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(self.file) or {}
                self.file.close()
                raise _in_use(self.directory, holder) from None
            if _same_file(self.file, path):
                break
            self.file.close()  # its holder ended and removed it between our open and our lock: again
        self.stale = _read_holder(self.file)
        _report_stale(self.directory, self.stale)
        self.file.seek(0)
        self.file.truncate()
        holder = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.file.write(json.dumps(holder) + "\n")
        self.file.flush()
        return self

    def release(self) -> None:
        """Give the lock up. A clean end (or a refusal) removes the file; a killed run leaves it, naming
        itself, and the next run calls it stale. Removed before unlocking: a run that opened it
        meanwhile sees that it is gone and opens a new one."""
        (self.directory / LOCK_FILE).unlink(missing_ok=True)
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def check_free(directory: str | Path) -> None:
    """Pre-flight: raise OutputInUseError if a running command holds `directory` (nothing is created).

    The stage takes the lock itself when it starts writing; this only lets a busy output be
    refused before Ray starts. A stale lock is reported here and taken over by the stage.
    """
    path = Path(directory) / LOCK_FILE
    try:
        file = open(path)  # noqa: SIM115  closed below
    except (FileNotFoundError, IsADirectoryError):
        return
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(directory, _read_holder(file) or {}) from None
        stale = _read_holder(file)
        fcntl.flock(file, fcntl.LOCK_UN)
    _report_stale(directory, stale)
