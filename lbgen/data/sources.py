"""What `pretrain --data` reads: lbgen shards, an ImageFolder tree keyed by class id, or plain image/label Parquet.

The last two let a real-data baseline (ImageNet's train split as `train/<wnid>/*.JPEG`, or the Hugging Face
`imagenet-1k` Parquet files) train with the same code, recipe and loader as a generated dataset. Every
source hands `decode_batch` the same rows: `image` (struct with bytes), `label`, `index` (the row's stable
number, which the held-out split hashes) and `path`.

- lbgen shards (`lbgen.data.shards`): their own `label`, `index` and score columns.
- ImageFolder: `ROOT/<class_id>/<image>`. A folder's class id gives the label (its row in the class table;
  a folder naming no class is refused); `index` is the file's position among its class's files, sorted.
- Plain Parquet: `image` and `label` (a row of the class table). `index` is the row's number across the
  files in sorted order, read one row group per task so that the number is exact. Files whose row groups
  hold few classes (a class-sorted export) are shuffled globally for training, once per epoch.

ImageFolder and plain Parquet carry no scores: a score filter on them is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lbgen.data.classes import ClassTable
from lbgen.data.images import IMAGE_SUFFIXES
from lbgen.data.shards import RowFilter, ShardSet, find_shards, open_shards
from lbgen.runtime.storage import Location, locate
from lbgen.errors import ShardError
from lbgen.runtime.seeds import derive_seed


@dataclass
class _Counted:
    """Row counts per split of a source, as `ShardSet` has them."""

    rows: int = 0
    train_rows: int = 0
    val_rows: int = 0
    bytes: int = 0
    bad: list[str] = field(default_factory=list)  # sources without shards skip nothing

    def bytes_per_row(self) -> float:
        return self.bytes / max(self.rows, 1)

    def count(self, table: pa.Table, row_filter: RowFilter) -> None:
        self.rows += table.num_rows
        self.train_rows += int(row_filter.mask(table, "train").sum())
        self.val_rows += int(row_filter.mask(table, "val").sum())


def iid_distinct(classes: int, draws: int) -> float:
    """Expected distinct classes among `draws` uniform draws from `classes` classes."""
    return classes * (1 - (1 - 1 / classes) ** draws)


def _no_scores(row_filter: RowFilter, what: str) -> None:
    if row_filter.score_columns():
        raise ShardError(f"--data {what}: has no score columns, so --min-clip-score, --min-iqa and --require-clip-agrees cannot apply")


# ---------------------------------------------------------------- ImageFolder


def read_images(batch: pa.Table, filesystem: pafs.FileSystem) -> pa.Table:
    """Listing rows (path, label, index) -> the same rows with each file's bytes as `image`."""
    blobs = []
    for path in batch.column("path").to_pylist():
        with filesystem.open_input_file(path) as f:
            blobs.append({"bytes": f.read(), "path": None})
    return batch.append_column("image", pa.array(blobs, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])))


@dataclass
class ImageFolderSource(_Counted):
    """`ROOT/<class_id>/<image>` files (local or object store), listed once by the driver."""

    root: str = ""
    listing: pa.Table | None = field(default=None, repr=False)  # path, label, index
    filesystem: pafs.FileSystem = field(default_factory=pafs.LocalFileSystem, repr=False)

    @classmethod
    def open(cls, root: Location, classes: ClassTable, row_filter: RowFilter) -> ImageFolderSource:
        _no_scores(row_filter, str(root))
        labels = {class_id: i for i, class_id in enumerate(classes.ids)}
        found = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True))
        by_class: dict[str, list[pafs.FileInfo]] = {}
        for info in found:
            if info.type == pafs.FileType.File and "." + info.extension.lower() in IMAGE_SUFFIXES:
                by_class.setdefault(info.path[len(root.path.rstrip("/")) + 1:].split("/", 1)[0], []).append(info)
        unknown = sorted(set(by_class) - set(labels))
        if unknown:
            raise ShardError(f"--data {root}: {len(unknown)} folder(s) name no class id of the class table ({classes.source}): "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        if not by_class:
            raise ShardError(f"--data {root}: no images in <class_id>/ folders ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths, label_column, index = [], [], []
        for class_id in sorted(by_class):
            files = sorted(by_class[class_id], key=lambda info: info.path)
            paths += [info.path for info in files]
            label_column += [labels[class_id]] * len(files)
            index += range(len(files))
        listing = pa.table({"path": paths, "label": pa.array(label_column, pa.int64()), "index": pa.array(index, pa.int64())})
        # In a seeded random order: the class-sorted listing, cut into blocks, would give blocks of one class,
        # and batches drawn through a shuffle buffer of a few blocks would see a few classes.
        listing = listing.take(np.random.default_rng(derive_seed(row_filter.seed, "listing-order")).permutation(listing.num_rows))
        source = cls(root=str(root), listing=listing, filesystem=root.fs,
                     bytes=sum(info.size for files in by_class.values() for info in files))
        source.count(listing, row_filter)
        return source

    def read(self, train: bool, block_rows: int, columns: list[str]):
        import ray.data

        blocks = [self.listing.slice(start, block_rows) for start in range(0, self.listing.num_rows, block_rows)]
        ds = ray.data.from_arrow(blocks)
        ds = ds.randomize_block_order() if train else ds
        return ds.map_batches(read_images, batch_format="pyarrow", batch_size=None, fn_kwargs={"filesystem": self.filesystem})

    def to_json(self) -> dict:
        return {"kind": "imagefolder", "root": self.root, "rows": self.rows, "train_rows": self.train_rows,
                "val_rows": self.val_rows, "bytes": self.bytes, "filesystem": self.filesystem.type_name}


# ---------------------------------------------------------------- plain Parquet


def read_row_group(unit: dict, filesystem: pafs.FileSystem) -> list[dict]:
    """A (file, row_group, first_index) unit -> its rows (image, label, index, path)."""
    with filesystem.open_input_file(unit["file"]) as f:
        rows = pq.ParquetFile(f).read_row_group(unit["row_group"], columns=["image", "label"]).to_pylist()
    for offset, row in enumerate(rows):
        row.update(index=unit["first_index"] + offset, path=unit["file"])
    return rows


@dataclass
class PlainParquetSource(_Counted):
    """Parquet files with `image` and integer `label` columns only, numbered across files in sorted order."""

    units: list[dict] = field(default_factory=list)  # file, row_group, first_index
    filesystem: pafs.FileSystem = field(default_factory=pafs.LocalFileSystem, repr=False)
    # Distinct classes per row group, as found and as iid rows would give: a row group is a read block, so
    # far fewer than iid means batches of a few classes unless the rows are shuffled across row groups.
    classes_per_group: float = 0.0
    iid_classes_per_group: float = 0.0

    @property
    def class_sorted(self) -> bool:
        return self.classes_per_group < 0.9 * self.iid_classes_per_group

    @classmethod
    def open(cls, files: list[Location], classes: ClassTable, row_filter: RowFilter) -> PlainParquetSource:
        _no_scores(row_filter, str(files[0].parent))
        source, first, distinct, iid = cls(filesystem=files[0].fs), 0, [], []
        for location in files:
            try:
                with location.open_input() as handle:
                    parquet = pq.ParquetFile(handle)
                    labels = parquet.read(columns=["label"]).column("label")
                    groups = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
                    source.bytes += handle.size()
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise ShardError(f"{location}: not a readable Parquet file with a label column ({type(err).__name__}: {err})") from None
            values = labels.to_numpy(zero_copy_only=False)
            if labels.null_count or ((values < 0) | (values >= len(classes))).any():
                raise ShardError(f"{location}: labels must be rows of the class table (0..{len(classes) - 1}, {classes.source})")
            source.count(pa.table({"label": labels, "index": pa.array(np.arange(first, first + len(values)), pa.int64())}), row_filter)
            start = 0
            for group, size in enumerate(groups):
                source.units.append({"file": location.path, "row_group": group, "first_index": first})
                distinct.append(len(np.unique(values[start:start + size])))
                iid.append(iid_distinct(len(classes), size))
                first, start = first + size, start + size
        source.classes_per_group, source.iid_classes_per_group = float(np.mean(distinct)), float(np.mean(iid))
        return source

    def read(self, train: bool, block_rows: int, columns: list[str]):
        import ray.data

        ds = ray.data.from_items(self.units, override_num_blocks=len(self.units))
        ds = ds.randomize_block_order() if train else ds
        # flat_map, not map_batches: Ray Data fuses a map_batches read into the decode stage and bundles
        # `decode_batch_size` *units* per task (512 row groups: one task reading most of a file set).
        ds = ds.flat_map(read_row_group, fn_kwargs={"filesystem": self.filesystem})
        # A class-sorted file read by row groups feeds the shuffle buffer a few classes at a time; Ray Data's
        # all-to-all shuffle (a new order each epoch, at the cost of moving every row through the object store)
        # is the only order-independent mix. `lbgen pretrain` says so when it picks it.
        return ds.random_shuffle() if train and self.class_sorted else ds

    def to_json(self) -> dict:
        return {"kind": "parquet", "files": sorted({u["file"] for u in self.units}), "rows": self.rows, "train_rows": self.train_rows,
                "val_rows": self.val_rows, "bytes": self.bytes, "filesystem": self.filesystem.type_name,
                "classes_per_row_group": round(self.classes_per_group, 2), "iid_classes_per_row_group": round(self.iid_classes_per_group, 2),
                "global_shuffle": self.class_sorted}


# ---------------------------------------------------------------- dispatch


def _is_image_folder(location: Location) -> bool:
    """A directory with sub-folders and no Parquet files of its own (nor a `data/` of them)."""
    if not location.is_dir() or location.glob("*.parquet") or (location / "data").is_dir():
        return False
    return any(child.is_dir() for child in location.iterdir())


def _is_plain(files: list[Location]) -> bool:
    """Parquet with image and label but without lbgen's class_id and index (a damaged file: not plain, so
    that the shard checks name it)."""
    try:
        with files[0].open_input() as handle:
            names = pq.ParquetFile(handle).schema_arrow.names
    except Exception:  # noqa: BLE001  pyarrow raises several types for a damaged file
        return False
    return {"image", "label"} <= set(names) and not {"class_id", "index"} & set(names)


# What `open_training_data` returns: each has the row counts, `read(train, block_rows, columns)` and `to_json()`.
TrainingData = Union[ShardSet, "ImageFolderSource", "PlainParquetSource"]


def open_training_data(data: list[str], classes: ClassTable, row_filter: RowFilter, skip_bad: bool = False):
    """The source of `--data`: a `ShardSet`, an `ImageFolderSource` or a `PlainParquetSource`, rows counted.

    One kind per run: an ImageFolder is one `--data` entry; Parquet entries are all lbgen shards or all plain.
    """
    entries = [locate(d) for d in data]
    if any(_is_image_folder(e) for e in entries if e.exists()):
        if len(entries) != 1:
            raise ShardError(f"--data {' '.join(data)}: an ImageFolder tree is read alone; give it as the only --data entry")
        return ImageFolderSource.open(entries[0], classes, row_filter)
    files = find_shards(data)
    if _is_plain(files):
        return PlainParquetSource.open(files, classes, row_filter)
    return open_shards(data, classes, row_filter, skip_bad=skip_bad)
