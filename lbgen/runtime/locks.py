"""One writer per output: a running stage holds a lock on its output directory.

Local outputs: the lock is an advisory `flock` on `OUT/.lbgen.lock`, held by the driver for the whole
stage. The kernel drops it when the process ends, however it ends, so a killed run never blocks a
re-run; a clean end removes the file, a killed run leaves it naming the dead holder, and the next run
says that it found a stale lock and takes it. `flock` works on local disks and on NFSv4 (as a POSIX lock).

S3 outputs (`s3://...`): the lock is the object `OUT/.lbgen.lock`, created by a conditional put that
only one of several racing runs wins. S3 cannot tell whether its writer still runs, so the holder
keeps a lease, renewed in the background; a lease not renewed in time is stale, said so, and taken
over (`ObjectStoreLock`). Other object stores (gs://, hdfs://) are not locked (`lock_output` warns).

Either way a second command on a held output is refused with one line naming the holder (host, pid,
command, start time).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from lbgen.config.paths import is_uri
from lbgen.runtime.storage import Location, Where, locate
from lbgen.errors import OutputInUseError, StorageError

LOCK_FILE = ".lbgen.lock"
LEASE_S = 60.0  # an S3 lock's lease: how long a killed run's lock blocks the next run
log = logging.getLogger(__name__)


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _holder_text(holder: dict) -> str:
    return (f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {_clock(holder.get('started', 0))})")


def _report_stale(directory: str | Path | Location, holder: dict | None, why: str = "that process is gone") -> None:
    if holder:
        log.warning("%s: the lock left by %s is stale (%s): this run takes it over",
                    directory, _holder_text(holder), why)


def _same_file(file, path: Path) -> bool:
    """Whether the open `file` is still what `path` names (not removed or replaced since it was opened)."""
    try:
        return os.fstat(file.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _in_use(directory: str | Path | Location, holder: dict, wait: str = "wait for it to finish") -> OutputInUseError:
    return OutputInUseError(f"{directory} is in use by {_holder_text(holder)}: one writer per output; "
                            f"{wait}, or use another --output")


def _parse_holder(text: str) -> dict | None:
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return {"command": text.strip()[:80]}


def _read_holder(file) -> dict | None:
    file.seek(0)
    return _parse_holder(file.read())


def _this_run(command: str | None) -> dict:
    """What a lock says about its holder: this process and its command line."""
    command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
    return {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


class OutputLock:
    """`with OutputLock(directory, "lbgen generate"):` holds `directory` for this process, or raises
    OutputInUseError naming the process that holds it. Creates `directory` if needed."""

    def __init__(self, directory: str | Path, command: str | None = None):
        self.directory = Path(directory)
        self.command = command
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
        self.file.write(json.dumps(_this_run(self.command)) + "\n")
        self.file.flush()
        return self

    def release(self) -> None:
        """Give the lock up. A clean end (or a refusal) removes the file; a killed run leaves it, naming
        itself, and the next run calls it stale. Removed before unlocking: a run that opened it
        meanwhile sees that it is gone and opens a new one."""
        (self.directory / LOCK_FILE).unlink(missing_ok=True)
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


# S3's answers to a conditional request that lost a race: the object is not the one named (412),
# another conditional write to it is in flight (409), or it is gone (404).
_LOST = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"}


def _s3_client(location: Location):
    """A boto3 client for the endpoint, region and keys that `location`'s filesystem was made with (the
    URI's query); boto3 reads the usual AWS variables (AWS_ENDPOINT_URL too) for what they leave out."""
    import boto3  # only S3 outputs need it

    # pyarrow shows an S3FileSystem's options only through pickling (as Ray ships one to its workers).
    options = location.fs.__reduce__()[1][0]
    endpoint = options["endpoint_override"]
    if endpoint and "://" not in endpoint:
        endpoint = f"{options['scheme'] or 'https'}://{endpoint}"
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=options["region"] or None,
                        aws_access_key_id=options["access_key"] or None,
                        aws_secret_access_key=options["secret_key"] or None,
                        aws_session_token=options["session_token"] or None)


def _expires(holder: dict) -> float:
    """When a lease runs out (a lock without one, not written by lbgen, is stale at once)."""
    return holder.get("renewed", 0) + holder.get("lease", 0)


def _refuse_live(location: Location, holder: dict) -> None:
    """OutputInUseError if `holder`'s lease still runs (saying until when, should that run have been killed)."""
    expires = _expires(holder)
    if expires > time.time():
        raise _in_use(location, holder, f"wait for it to finish (a killed run's lease runs out at {_clock(expires)})")


def _report_expired(location: Location, holder: dict) -> None:
    _report_stale(location, holder, f"its lease ran out at {_clock(_expires(holder))}")


class ObjectStoreLock:
    """`with ObjectStoreLock(location, "lbgen generate"):` holds the S3 output `location` for this
    process, or raises OutputInUseError naming the run that holds it.

    The lock is the object `OUT/.lbgen.lock`, put only if absent (`If-None-Match: *`): of runs racing
    for a free output, S3 lets exactly one create it. Its body names the holder, when it last renewed
    its lease, and for how long a lease lasts; a daemon thread renews it every lease/3 s, only if it
    is still what this run last wrote (`If-Match` on that ETag). A lease not renewed for `lease` s is
    stale (a killed run): reported, and taken over by a put `If-Match` its ETag, so that of runs taking
    over one stale lock exactly one wins. Needs S3's conditional writes (AWS since 2024; a store without
    them ignores the headers, and then two runs can both hold the lock).
    Clocks: hosts that share an output must agree on the time to well within a lease.
    """

    def __init__(self, location: Location, command: str | None = None, lease: float = LEASE_S):
        self.location = location
        self.bucket, _, self.key = (location / LOCK_FILE).path.partition("/")
        self.command = command
        self.lease = lease
        self.stale: dict | None = None  # the holder whose lease had run out, if any
        self.s3 = _s3_client(location)
        self._holder: dict = {}
        self._etag: str | None = None  # of the body this run last wrote: the lock is ours while it is there
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> ObjectStoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> ObjectStoreLock:
        """Take the lock (see the class); returns self."""
        # The ETag is the body's MD5: a token keeps two runs' bodies, and so their ETags, apart.
        self._holder = {**_this_run(self.command), "lease": self.lease, "token": uuid.uuid4().hex}
        while not self._put(IfNoneMatch="*"):
            found = self.current()
            if found is None:
                continue  # its holder released it between our put and our read: again
            holder, etag = found
            _refuse_live(self.location, holder)
            if self._put(IfMatch=etag):
                self.stale = holder
                _report_expired(self.location, holder)
                break
            # another run took it over first: the next read names it
        self._heartbeat = threading.Thread(target=self._renew, name=f"lease {self.location}", daemon=True)
        self._heartbeat.start()
        return self

    def release(self) -> None:
        """Give the lock up: stop renewing and delete the object, only if it is still ours (`If-Match`:
        a run that took over a lease this one let run out keeps its lock). A killed run leaves the
        object, and its lease runs out. A failed delete is a warning: the lease runs out all the same."""
        self._stop.set()
        self._heartbeat.join()
        try:
            self._call("delete_object", IfMatch=self._etag)
        except StorageError as err:
            log.warning("%s (the lock is free once its lease runs out)", err)

    def current(self) -> tuple[dict, str] | None:
        """The holder the lock object names and its ETag; None if there is none."""
        found = self._call("get_object")
        return found and (_parse_holder(found["Body"].read().decode()) or {}, found["ETag"])

    def _put(self, **condition) -> bool:
        """Write this run's holder, renewed now, if `condition` holds; False if it did not."""
        body = json.dumps({**self._holder, "renewed": time.time()})
        written = self._call("put_object", Body=body.encode(), ContentType="application/json", **condition)
        if written:
            self._etag = written["ETag"]
        return bool(written)

    def _call(self, operation: str, **kwargs) -> dict | None:
        """`operation` on the lock object; None when a condition failed or the object is missing."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.s3, operation)(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in _LOST:
                return None
            raise StorageError(f"{self.location}: lock {LOCK_FILE}: {err}") from None
        except BotoCoreError as err:
            raise StorageError(f"{self.location}: lock {LOCK_FILE}: {err}") from None

    def _renew(self) -> None:
        """The heartbeat: renew the lease until released, or until another run has taken the lock."""
        while not self._stop.wait(self.lease / 3):
            try:
                renewed = self._put(IfMatch=self._etag)
            except StorageError as err:  # e.g. the endpoint briefly unreachable: the next beat tries again
                log.warning("could not renew the lease: %s", err)
                continue
            if not renewed:
                found = self.current()
                taker = f"to {_holder_text(found[0])}" if found else "(its lock object was deleted)"
                log.error("%s: this run lost its lock %s, its lease not renewed in time: another run may now "
                          "write this output too", self.location, taker)
                return


def lock_output(where: Where, command: str | None = None) -> OutputLock | ObjectStoreLock | None:
    """Hold the output `where` for this run: the lock, taken (see the classes), or None (warned) on an
    object store other than S3."""
    location = locate(where)
    if location.fs.type_name == "local":
        return OutputLock(location.path, command).acquire()
    if location.fs.type_name == "s3":
        return ObjectStoreLock(location, command).acquire()
    log.warning("%s: not locked (lbgen locks local and s3:// outputs): one writer per output is up to you", location)
    return None


def check_free(where: str | Path) -> None:
    """Pre-flight: raise OutputInUseError if a running command holds the output `where` (nothing is created).

    The stage takes the lock itself when it starts writing; this only lets a busy output be
    refused before Ray starts. A stale lock is reported here and taken over by the stage.
    """
    if is_uri(where):
        location = locate(where)
        if location.fs.type_name == "s3":
            return _check_free_s3(location)
        if location.fs.type_name != "local":
            return  # not locked: the stage says so
        where = location.path
    path = Path(where) / LOCK_FILE
    try:
        file = open(path)  # noqa: SIM115  closed below
    except (FileNotFoundError, IsADirectoryError):
        return
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(where, _read_holder(file) or {}) from None
        stale = _read_holder(file)
        fcntl.flock(file, fcntl.LOCK_UN)
    _report_stale(where, stale)


def _check_free_s3(location: Location) -> None:
    found = ObjectStoreLock(location).current()
    if found is not None:
        _refuse_live(location, found[0])
        _report_expired(location, found[0])
