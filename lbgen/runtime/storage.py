"""Local paths and object-store URIs alike, through pyarrow's filesystems.

`locate(where)` turns a local path or a URI (`s3://`, `gs://`, `hdfs://`, `file://`, ...)
into a `Location`: a `pyarrow.fs.FileSystem` and a path in it, with the few operations the
stages need (exists, list, read, atomic write, delete). Readers that take a filesystem
(`pyarrow.parquet`, `ray.data.read_parquet`) get `location.fs` and `location.path` directly.

S3 settings come from the URI's query (`s3://bucket/ds?endpoint_override=host:9000&scheme=http
&region=eu-west-1`, see `pyarrow.fs.S3FileSystem`) or from the usual AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import pyarrow as pa
import pyarrow.fs as pafs

from lbgen.config.paths import is_uri
from lbgen.errors import StorageError  # noqa: F401  (raised here; defined with the others)

# What stages accept wherever a location may be remote.
Where = Union[str, Path, "Location"]

def absolute(where: str | Path) -> str:
    """A URI unchanged, a local path made absolute: the form to hand to workers on other nodes."""
    return str(where) if is_uri(where) else str(Path(where).expanduser().resolve())


@dataclass(frozen=True)
class Location:
    """A file or directory: `path` inside the filesystem `fs`."""

    fs: pafs.FileSystem
    path: str

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.path if self.fs.type_name == "local" else f"{self.fs.type_name}://{self.path}"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rstrip("/").rsplit("/", 1)[0] or "/")

    # Metadata operations are where a wrong bucket, endpoint or credentials shows first: their
    # errors become one StorageError naming the location, before a stage writes anything.

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as err:
            raise StorageError(f"{self}: {err}") from None

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def size(self) -> int:
        return self.info().size

    def iterdir(self) -> list[Location]:
        """The entries directly under this directory, by name ([] if it does not exist)."""
        try:
            found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as err:
            raise StorageError(f"{self}: {err}") from None
        return sorted((Location(self.fs, info.path) for info in found), key=lambda loc: loc.name)

    def glob(self, pattern: str) -> list[Location]:
        """Entries directly under this directory whose name matches `pattern` (fnmatch), by name."""
        return [child for child in self.iterdir() if fnmatch.fnmatchcase(child.name, pattern)]

    def mkdir(self) -> None:
        """Create this directory and its parents (object stores: a marker; the bucket must exist)."""
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as err:
            raise StorageError(f"{self}: {err}") from None

    # Data operations.

    def open_input(self) -> pa.NativeFile:
        """A random-access file (what `pyarrow.parquet` readers take)."""
        return self.fs.open_input_file(self.path)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write `data` so that this location holds either its old content or all of `data`.

        Written to a hidden temp name beside it, then moved. Locally the move is a rename, atomic
        on POSIX. On object stores a move is one server-side copy that creates the final object
        whole (then a delete of the temp): writing the final key directly would not do, since
        pyarrow completes an upload when a stream is closed, also after an error part-way.
        An interrupted write leaves at most a temp object (`.NAME.tmp-*`), never a partial NAME.
        """
        tmp = self.parent / f".{self.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(tmp.path) as out:
                out.write(data)
            self.fs.move(tmp.path, self.path)
        except BaseException:
            with contextlib.suppress(OSError):  # the original error is the one to report
                tmp.unlink(missing_ok=True)
            raise

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete_tree(self) -> None:
        """Delete this directory and everything under it; nothing when it does not exist."""
        if self.exists():
            self.fs.delete_dir(self.path)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


def locate(where: Where) -> Location:
    """The `Location` of a local path (made absolute) or of a URI; an unusable URI -> StorageError."""
    if isinstance(where, Location):
        return where
    if not is_uri(where):
        return Location(pafs.LocalFileSystem(), str(Path(where).expanduser().resolve()))
    try:
        fs, path = pafs.FileSystem.from_uri(str(where))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise StorageError(f"{where}: not a usable filesystem URI ({err})") from None
    return Location(fs, path.rstrip("/") or path)
