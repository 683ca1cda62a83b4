"""lbgen.runtime.storage: local paths and object-store URIs, against a real S3 API (moto's server on 127.0.0.1).

The S3 endpoint travels in the URI's query (`?endpoint_override=...&scheme=http`), the dummy
credentials in the usual AWS variables (set in conftest, before Ray starts, for Ray's workers too).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from configs import tiny_generate
from rows import assert_same_row

from lbgen.cli import main as cli_main
from lbgen.config import resolve
from lbgen.data.classes import load_class_table
from lbgen.data.format import MANIFEST
from lbgen.data.reader import inspect_dataset, read_manifest
from lbgen.data.shards import RowFilter, ShardError, open_shards
from lbgen.runtime.storage import Location, StorageError, absolute, is_uri, locate
from lbgen.data.writer import claim_output
from lbgen.errors import DatasetError
from lbgen.models.generator import LORA_FILE
from lbgen.stages.generate import GenerateBatch, check_lora, generate, plan

BUCKET = "lbgen-test"  # the bucket of conftest's `s3` fixture
CLASSES = ["tench", "goldfish", "hammerhead"]  # x 2 images, 2 rows per shard: 3 shards


@pytest.fixture(scope="module")
def table_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("classes") / "three.txt"
    path.write_text("".join(f"n{i:08d} {name}\n" for i, name in enumerate(CLASSES)))
    return path


# The tiny preset on a class table file, into an output location.
tiny_cfg = partial(tiny_generate, images_per_class=2, workers=1)


def rows_of(where: str) -> dict:
    """(label, index) -> row of every shard under a dataset location (local path or URI)."""
    data = locate(where) / "data"
    table = pq.read_table(data.path, filesystem=data.fs)
    return {(r["label"], r["index"]): r for r in table.to_pylist()}


def assert_same_rows(a: dict, b: dict) -> None:
    """Same rows: image bytes and metadata equal, model outputs up to rounding."""
    assert a.keys() == b.keys()
    for key, row in a.items():
        assert_same_row(row, b[key])


def listing(where: Location) -> dict[str, int]:
    """Name -> size of every file under `where` (recursive)."""
    found = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True, allow_not_found=True))
    return {info.path[len(where.path) + 1:]: info.size for info in found if info.type == pafs.FileType.File}


# ---------------------------------------------------------------- locations


def test_locate_local_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = locate("ds")
    assert isinstance(local.fs, pafs.LocalFileSystem) and local.path == str(tmp_path / "ds") and str(local) == local.path
    assert locate(f"file://{tmp_path}/ds") == local and absolute("ds") == str(tmp_path / "ds")
    assert is_uri("s3://b/k") and is_uri("file:///x") and not is_uri("runs/x") and not is_uri("C:\\data")
    assert absolute("s3://b/k?region=x") == "s3://b/k?region=x"
    with pytest.raises(StorageError, match="nosuch://b/k: not a usable filesystem URI"):
        locate("nosuch://b/k")


def test_location_operations_on_s3(s3):
    root = locate(s3("ops"))
    assert str(root) == f"s3://{BUCKET}/ops" and not root.exists() and root.iterdir() == []
    (root / "data" / "b.parquet").write_bytes(b"bb")
    (root / "data" / "a.parquet").write_text("a")
    (root / "notes.txt").write_text("n")
    assert [c.name for c in root.iterdir()] == ["data", "notes.txt"] and (root / "data").is_dir()
    assert [c.name for c in (root / "data").glob("*.parquet")] == ["a.parquet", "b.parquet"]
    assert (root / "data" / "b.parquet").read_bytes() == b"bb" and (root / "data" / "b.parquet").size() == 2
    (root / "data" / "a.parquet").unlink()
    (root / "data" / "a.parquet").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (root / "data" / "a.parquet").unlink()
    assert listing(root) == {"data/b.parquet": 2, "notes.txt": 1}


def test_unreachable_bucket_is_one_clear_error(s3):
    with pytest.raises(StorageError, match="s3://no-such-bucket/ds: .*Bucket 'no-such-bucket' not found"):
        locate(s3("ds").replace(BUCKET, "no-such-bucket")).mkdir()


class FailingUploads:
    """A pyarrow filesystem whose uploads die half-way; the stream is closed anyway, as pyarrow's `with` does."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_output_stream(self, path: str):
        stream = self.fs.open_output_stream(path)

        class HalfWritten:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                stream.close()  # on S3 this completes the upload: half an object under the name written

            def write(self, data: bytes):
                stream.write(data[: len(data) // 2])
                raise OSError("connection reset")

        return HalfWritten()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_bytes_shows_old_or_whole_content_never_a_part(where, s3, tmp_path):
    target = locate(s3("atomic/x.bin") if where == "s3" else tmp_path / "atomic" / "x.bin")
    target.parent.mkdir()
    target.write_bytes(b"old")
    failing = Location(FailingUploads(target.fs), target.path)
    with pytest.raises(OSError, match="connection reset"):
        failing.write_bytes(b"new" * 1000)
    assert target.read_bytes() == b"old" and listing(target.parent) == {"x.bin": 3}  # no temp left either
    target.write_bytes(b"new" * 1000)
    assert target.read_bytes() == b"new" * 1000 and listing(target.parent) == {"x.bin": 3000}


@pytest.mark.parametrize(("stage", "field"), [("finetune", "output"), ("pretrain", "output"), ("evaluate", "downstream"),
                                             ("run", "output"), ("make-downstream", "output")])
def test_stages_that_write_locally_refuse_uris_up_front(stage, field, ray_local, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main([stage, f"--{field}", "s3://b/x"]) == 2
    err = capsys.readouterr().err
    assert f"{stage.replace('-', '_')}.{field} must be a local path, got 's3://b/x'" in err and "generate.output" in err
    assert list(tmp_path.iterdir()) == []  # no local directory named "s3:"


# ---------------------------------------------------------------- generate into S3


@pytest.fixture(scope="module")
def local_run(ray_local, table_file, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("local") / "ds")
    return output, generate(tiny_cfg(table_file, output), show_progress=False)


@pytest.fixture(scope="module")
def s3_run(ray_local, s3, table_file, local_run):
    uri = s3("gen/ds")
    return uri, generate(tiny_cfg(table_file, uri), show_progress=False)


@pytest.mark.slow
def test_generate_into_s3_equals_local_and_inspects(s3_run, local_run, capsys):
    uri, manifest = s3_run
    assert manifest["totals"]["rows"] == 6 and manifest["throughput"]["images_this_run"] == 6
    assert_same_rows(rows_of(uri), rows_of(local_run[0]))
    names = [f"data/train-{k:05d}-of-00003.parquet" for k in range(3)]
    assert sorted(listing(locate(uri))) == sorted(names + [MANIFEST, "README.md", "config.yaml"])  # no temp objects
    assert read_manifest(uri)["shards"] == manifest["shards"]
    assert cli_main(["inspect", uri]) == 0
    assert f"{uri}: valid" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_on_s3_regenerates_only_the_deleted_shard(s3_run, table_file, local_run):
    uri, manifest = s3_run
    shard = locate(uri) / "data" / "train-00001-of-00003.parquet"
    shard.unlink()
    assert not inspect_dataset(uri).ok
    again = generate(tiny_cfg(table_file, uri), show_progress=False)
    assert again["throughput"]["images_this_run"] == 2 and again["shards"].keys() == manifest["shards"].keys()
    assert inspect_dataset(uri).ok
    assert_same_rows(rows_of(uri), rows_of(local_run[0]))


@pytest.mark.slow
def test_s3_output_with_other_settings_is_refused_then_overwritten(s3_run, table_file, s3):
    uri, _ = s3_run
    before = listing(locate(uri))
    with pytest.raises(DatasetError, match=r"other settings.*seed: 0 -> 7"):
        generate(dataclasses.replace(tiny_cfg(table_file, uri), seed=7))
    assert listing(locate(uri)) == before

    copy = locate(s3("gen/copy"))
    for name in before:  # a copy plus a file that is not generate's
        (copy / name).write_bytes((locate(uri) / name).read_bytes())
    (copy / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="other settings"):
        claim_output(copy, {"other": "content"}, overwrite=False)
    assert claim_output(copy, {"other": "content"}, overwrite=True) is None
    assert listing(copy) == {"notes.txt": 7}


@pytest.mark.slow
def test_pretrain_shard_checks_read_from_s3(s3_run, table_file, s3):
    uri, _ = s3_run
    table = load_class_table(str(table_file))
    shards = open_shards([uri], table, RowFilter(val_fraction=0.5))
    assert shards.filesystem.type_name == "s3" and shards.rows == 6 and shards.train_rows + shards.val_rows == 6
    assert shards.files == [f"{BUCKET}/gen/ds/data/train-{k:05d}-of-00003.parquet" for k in range(3)]
    assert shards.bytes == sum(size for name, size in listing(locate(uri)).items() if name.startswith("data/"))
    assert shards.to_json()["filesystem"] == "s3"

    bad = locate(s3("gen/bad"))
    for k in range(3):
        name = f"train-{k:05d}-of-00003.parquet"
        (bad / name).write_bytes(b"not parquet" if k == 1 else (locate(uri) / "data" / name).read_bytes())
    with pytest.raises(ShardError, match=rf"s3://{BUCKET}/gen/bad/train-00001-of-00003.parquet: not a readable Parquet"):
        open_shards([s3("gen/bad")], table, RowFilter())
    skipped = open_shards([s3("gen/bad")], table, RowFilter(), skip_bad=True)
    assert len(skipped.bad) == 1 and skipped.rows == 4
    with pytest.raises(ShardError, match="on another filesystem"):
        open_shards([uri, "/nonexistent"], table, RowFilter())  # checked before the path is opened


def test_file_uri_dataset_inspects_resumes_and_reads(local_run, table_file, capsys):
    uri = f"file://{local_run[0]}"
    assert cli_main(["inspect", uri]) == 0
    again = generate(tiny_cfg(table_file, uri), show_progress=False)  # complete: nothing to make, no Ray
    assert again["throughput"]["images_this_run"] == 0 and again["shards"] == local_run[1]["shards"]
    shards = open_shards([uri], load_class_table(str(table_file)), RowFilter())
    assert shards.rows == 6 and shards.files[0].startswith(local_run[0])


def test_lora_from_s3_equals_lora_from_a_local_dir(s3, table_file, tmp_path):
    from test_generate import make_lora

    local = make_lora(tmp_path / "lora")
    uri = s3("lora")
    (locate(uri) / LORA_FILE).write_bytes((local / LORA_FILE).read_bytes())
    assert check_lora(uri) == check_lora(str(local))
    cfg = tiny_cfg(table_file, str(tmp_path / "unused"), lora=str(local))
    rows = plan(load_class_table(str(table_file)), cfg)[:2]
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    from_uri = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, lora=uri))
    np.testing.assert_array_equal(GenerateBatch(dataclasses.asdict(from_uri))(batch)["pixels"],
                                  GenerateBatch(dataclasses.asdict(cfg))(batch)["pixels"])


@pytest.mark.slow
def test_pretrain_trains_on_shards_in_s3(ray_local, s3_run, table_file, tmp_path):
    """Ray Data's read tasks get the filesystem (endpoint included) from the driver's `--data` URI."""
    import json

    from lbgen.stages.pretrain import pretrain

    uri, _ = s3_run
    output = tmp_path / "pretrain"
    pretrain(resolve("tiny", overrides={"classes": str(table_file), "pretrain": {
        "data": [uri], "output": str(output), "epochs": 1, "batch_size": 2, "val_fraction": 0.0, "warmup_epochs": 0.0,
        "decode_batch_size": 2, "read_block_rows": 2}}))
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["epoch"] == 1 and metrics[-1]["step"] == 3  # 6 rows, batch 2
    assert json.loads((output / "shards.json").read_text())["filesystem"] == "s3"
    assert (output / "backbone.safetensors").exists()
