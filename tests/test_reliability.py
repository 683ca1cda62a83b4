"""Reliability: bad input is refused with one clear line before Ray starts, untrusted files never
run code, and a full disk stops `generate` cleanly with every whole shard kept (issue 6, items 4-6).

Bad input goes through the real CLI entry, `lbgen.cli.main`; `init_ray` is replaced by a sentinel
so that any input reaching the cluster start is seen (valid input must get there, bad input must not).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lbgen import cli
from lbgen.config import Config, leaf_fields, resolve
from lbgen.data.classes import ClassTableError, load_class_table


def fuzz(examples: int) -> settings:
    """Hypothesis settings: `examples` cases, no per-case deadline (the machine is shared and noisy)."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class ReachedRay(Exception):
    """Raised by the stand-in `init_ray`: the CLI accepted every input and was about to start Ray."""


@pytest.fixture
def cli_until_ray(monkeypatch, capsys):
    """Run `lbgen ARGV`; returns (exit code or "ray", stderr). "ray": every check passed."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a hub id answers at once: not found

    def stand_in(address):
        raise ReachedRay

    monkeypatch.setattr(cli, "init_ray", stand_in)

    def run(argv: list[str]) -> tuple[int | str, str]:
        if "--preset" not in argv:  # these cases are about the input, on the small models
            argv = [argv[0], "--preset", "tiny", *argv[1:]]
        capsys.readouterr()
        try:
            code = cli.main(argv)
        except ReachedRay:
            code = "ray"
        return code, capsys.readouterr().err

    return run


def assert_refused(code, err: str, *needles: str) -> None:
    """Exit code 2 and exactly one stderr line, `lbgen CMD: error: ...`, holding every needle."""
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("lbgen ") and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def files_under(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- class tables (item 4)

# Text that stresses the readers: separators, quotes, tabs, control and non-ASCII characters.
NASTY = st.text(st.sampled_from(list("ab Z9_-.,;'\"\t\\{}:#|é漢\x00\x0b\x1c\x85\u2028\u00a0 ")), max_size=12)
IDS = st.text(st.sampled_from(list("abcn019_-.,'\"é ")), max_size=6)


def write_table(path: Path, rows: list[tuple[str, str]]) -> None:
    """Write `rows` as the format of `path`'s extension, each format's own way."""
    if path.suffix == ".txt":
        path.write_text("".join(f"{cid}\t{name}\n" for cid, name in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["class_id", "class_name"])
            writer.writerows(rows)
    else:
        pq.write_table(pa.table({"class_id": [r[0] for r in rows], "class_name": [r[1] for r in rows]}), path)


def txt_row(cid: str, name: str) -> tuple[str, str]:
    """A row a .txt table can hold: the id is one non-blank word, the name has no line break."""
    return "".join(cid.split()) or "x", name.replace("\n", " ").replace("\r", " ")


def expected_table(rows: list[tuple[str, str]], txt: bool) -> tuple[tuple, tuple] | None:
    """(ids, names) the documented rules give for `rows`, or None when the table must be refused."""
    if txt:  # blank lines are skipped
        rows = [r for r in rows if (r[0] + r[1]).strip()]
    ids, names = [r[0].strip() for r in rows], [r[1].strip() for r in rows]
    if not rows or not all(ids) or not all(names) or len(set(ids)) != len(ids):
        return None
    return tuple(ids), tuple(names)


@fuzz(150)
@given(rows=st.lists(st.tuples(IDS, NASTY), max_size=6), ext=st.sampled_from([".txt", ".csv", ".parquet"]))
@example(rows=[(" a", "x"), ("a", "y")], ext=".csv")  # ids equal once stripped: found by this test
@example(rows=[("a", "\x1cb c")], ext=".txt")  # a name holding a character str.splitlines breaks at
def test_class_tables_load_as_documented_or_name_file_and_line(rows, ext):
    if ext == ".txt":  # one `class_id class_name` per line: an id is never blank, a name never breaks the line
        rows = [txt_row(cid, name) for cid, name in rows]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"classes{ext}"
        write_table(path, rows)
        expected = expected_table(rows, txt=ext == ".txt")
        if expected is None:
            with pytest.raises(ClassTableError) as err:
                load_class_table(path)
            assert str(path) in str(err.value) and "\n" not in str(err.value)
        else:
            table = load_class_table(path)
            assert (table.ids, table.names) == expected


@fuzz(150)
@given(data=st.binary(max_size=200) | st.builds(lambda b: b"class_id,class_name\n" + b, st.binary(max_size=100)),
       ext=st.sampled_from([".txt", ".csv", ".parquet"]))
def test_class_table_bytes_load_or_are_refused_in_one_line(data, ext):
    """Arbitrary bytes (non-UTF-8, NUL, stray quotes): a table or a ClassTableError, never another exception."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"t{ext}"
        path.write_bytes(data)
        try:
            table = load_class_table(path)
        except ClassTableError as err:
            assert str(path) in str(err) and "\n" not in str(err)
        else:
            assert len(table) > 0 and all(table.ids) and all(n.strip() for n in table.names)
            assert len(set(table.ids)) == len(table.ids)


def test_csv_field_over_the_csv_limit_names_the_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("class_id,class_name\na,fish\nb," + "x" * 200_000 + "\n")
    with pytest.raises(ClassTableError, match=r"t.csv: not valid CSV after line 2 \(field larger than field limit"):
        load_class_table(path)


@pytest.mark.parametrize("column, values", [("class_name", [1, 2]), ("class_id", [1.5, None]), ("class_name", [["a"], ["b"]])])
def test_parquet_table_with_non_string_columns(tmp_path, column, values):
    other = "class_id" if column == "class_name" else "class_name"
    pq.write_table(pa.table({column: values, other: ["a", "b"]}), tmp_path / "t.parquet")
    try:
        table = load_class_table(tmp_path / "t.parquet")
    except ClassTableError as err:
        assert "t.parquet" in str(err) and column in str(err)
    else:
        assert all(isinstance(v, str) and v for v in table.ids + table.names)


@fuzz(40)
@given(rows=st.lists(st.tuples(IDS, NASTY), max_size=4), ext=st.sampled_from([".txt", ".csv", ".parquet"]))
def test_cli_refuses_a_bad_table_before_ray_and_writes_nothing(cli_until_ray, rows, ext):
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / f"classes{ext}", Path(tmp) / "out"
        rows = [txt_row(cid, name) if ext == ".txt" else (cid, name) for cid, name in rows]
        write_table(path, rows)
        code, err = cli_until_ray(["generate", "--classes", str(path), "--output", str(out)])
        if expected_table(rows, txt=ext == ".txt") is None:
            assert_refused(code, err, str(path))
        else:
            assert code == "ray", err
        assert not out.exists()


def test_long_names_are_truncated_to_the_text_context_and_encode(tmp_path):
    """A name longer than the text encoders' context loads, plans, and encodes (truncated, no crash)."""
    from lbgen.data.plan import plan
    from lbgen.method.sampler import encode_prompts
    from lbgen.models.clip import build_tiny as tiny_clip
    from lbgen.models.generator import create_generator

    long_a, long_b = "very " * 2000 + "long fish", "very " * 2000 + "long bird"  # differ only past the context
    path = tmp_path / "long.txt"
    path.write_text(f"n1 {long_a}\nn2 {long_b}\nn3 tench\n")
    table = load_class_table(path)
    assert table.names[0] == long_a
    cfg = resolve("tiny", overrides={"classes": str(path), "generate": {"images_per_class": 2}})
    assert sorted({(row["label"], row["prompt"]) for row in plan(table, cfg)}) == list(enumerate(table.names))

    pipe = create_generator("tiny", resolution=64)
    tok = pipe.tokenizer
    ids = tok(list(table.names), padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert {len(i) for i in ids} == {tok.model_max_length} == {pipe.text_encoder.config.max_position_embeddings}
    assert ids[0] == ids[1] != ids[2]  # truncated: the tails past the context are dropped
    states = encode_prompts(pipe, table.prompts(cfg.generate.prompt_template), "cpu")
    assert states.shape[:2] == (3, tok.model_max_length) and states.isfinite().all()
    clip = tiny_clip()
    assert clip.tokenizer(list(table.names)).shape == (3, clip.model.context_length)
    assert clip.encode_text(table.prompts("photo of {name}")).isfinite().all()


def test_ten_thousand_classes_load_and_plan_fast(tmp_path, cli_until_ray):
    from lbgen.data.format import label_names
    from lbgen.data.plan import num_shards, batch_rows

    path = tmp_path / "big.txt"
    path.write_text("".join(f"c{i:05d} class number {i % 9000}\n" for i in range(10_000)))  # 1000 repeated names
    start = time.perf_counter()
    table = load_class_table(path)
    cfg = resolve("tiny", overrides={"classes": str(path)})  # 8 images per class: 80 000 rows, 4 000 shards
    names = label_names(table.ids, table.names)
    rows = sum(len(batch_rows({"shard": k}, names=table.names, ids=table.ids, cfg=cfg)) for k in range(num_shards(len(table), cfg)))
    seconds = time.perf_counter() - start
    assert len(table) == 10_000 and len(set(names)) == 10_000 and rows == 80_000
    assert seconds < 10, f"load + plan took {seconds:.1f} s"
    start = time.perf_counter()
    assert cli_until_ray(["generate", "--classes", str(path), "--output", str(tmp_path / "out")])[0] == "ray"
    assert time.perf_counter() - start < 10
    print(f"10 000 classes: load + plan of 80 000 rows {seconds:.2f} s")


# ---------------------------------------------------------------- config files (item 4)

FIELDS = [".".join(path) for path, _, _ in leaf_fields(Config)]
VALUES = st.one_of(
    st.integers(-3, 10**6), st.integers(min_value=2**62), st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2), st.booleans(), st.none(), st.text(max_size=8), st.lists(st.integers(-1, 3), max_size=3),
    st.lists(st.text(max_size=4), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FIELD_TYPES = {".".join(path): tp for path, _, tp in leaf_fields(Config)}


def conforms(value, tp) -> bool:
    """Whether `value` is a well-typed value of annotation `tp`, judged apart from lbgen's own coercion:
    ints are ints (not bools), floats finite floats, lists of their item type, None only where optional."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return True
        (tp,) = [a for a in args if a is not type(None)]
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(conforms(v, typing.get_args(tp)[0]) for v in value)
    if tp is float:
        return type(value) is float and math.isfinite(value)
    return type(value) is tp


# Settings the generate command reads; a config setting them must pass or be refused, naming them.
GENERATE_FIELDS = [f for f in FIELDS if f.split(".")[0] in ("classes", "seed", "model", "generate") and f != "generate.output"]


def nested(path: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


@fuzz(120)
@given(field=st.sampled_from(GENERATE_FIELDS + ["finetune.lr", "pretrain.epochs", "evaluate.fractions", "generate.bogus", "nope"]),
       value=VALUES)
@example(field="model.generator", value="")  # not a hub id: used to escape as huggingface_hub's HFValidationError
@example(field="classes", value="")  # Path("") is ".": was refused as a directory, naming neither setting nor value
@example(field="classes", value="\x1e")  # a line separator in a path: the message stays one line, escaped
def test_config_files_work_or_name_the_setting(cli_until_ray, field, value):
    with tempfile.TemporaryDirectory() as tmp:
        config, out = Path(tmp) / "c.yaml", Path(tmp) / "out"
        config.write_text(yaml.safe_dump(nested(field, value)))
        code, err = cli_until_ray(["generate", "--config", str(config), "--output", str(out)])
        leaf = field.split(".")[-1]
        if code == "ray":
            cfg = resolve("tiny", config)
            got = cfg
            for part in field.split("."):
                got = getattr(got, part)
            assert got == value or (isinstance(got, float) and got == float(value))
            assert conforms(got, FIELD_TYPES[field]), f"{field} accepted {got!r}, not a {FIELD_TYPES[field]}"
        else:
            # The line names the setting, or the (non-empty) value it refers to (a table path, a model id, a LoRA dir).
            assert_refused(code, err)
            names_value = value not in ("", None) and (str(value) in err or repr(value)[1:-1] in err)
            assert leaf in err or names_value, err
        assert not out.exists()


@pytest.mark.parametrize("text, needle", [
    ("generate:\n  prompt_template: 'a {name} {}'\n", "generate.prompt_template"),
    ("generate:\n  score_template: '{nam}'\n", "generate.score_template"),
    ("finetune:\n  lr: .nan\n", "finetune.lr: expected a finite number"),
    ("finetune:\n  w_in: .inf\n", "finetune.w_in: expected a finite number"),
    ("generate:\n  images_per_class: -1\n", "generate.images_per_class must be > 0"),
    ("generate:\n  guidance: -0.5\n", "generate.guidance must be >= 0"),
    ("generate: 3\n", "expected a mapping"),
])
def test_config_values_that_used_to_fail_inside_workers(tmp_path, cli_until_ray, text, needle):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert_refused(*cli_until_ray(["generate", "--config", str(config), "--output", str(tmp_path / "out")]), needle)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- paths (item 4)


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    """A directory nobody may write into: a read-only tmpfs (root), or mode 555 (not root)."""
    path = tmp_path_factory.mktemp("ro")
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True, check=False).returncode:
        pytest.skip("running as root and cannot mount a read-only tmpfs: nothing is unwritable for root")
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Valid inputs for every command, so that each case breaks exactly one path."""
    from shape_shards import write_shape_shards

    from lbgen.data.downstream import make_downstream

    root = tmp_path_factory.mktemp("inputs")
    (root / "file").write_text("not a directory\n")
    (root / "empty").mkdir()
    make_downstream("shapes", root / "shapes", train_per_class=2, test_per_class=1, size=16)
    write_shape_shards(root / "shards", load_class_table("tiny10"), per_class=8, size=16)
    return root


def bad_path(root: Path, kind: str, request) -> Path:
    """A path of `kind` under `root`; only the read-only kind needs (and may skip for) the read-only mount."""
    if kind == "read-only":
        return request.getfixturevalue("read_only_dir") / "x"
    return {"missing": root / "missing" / "x", "file": root / "file", "under-a-file": root / "file" / "x",
            "empty-dir": root / "empty"}[kind]


# (command, flag, kind of bad path, other arguments); each case must be refused naming the path.
PATH_CASES = [
    *[(cmd, "--output", kind) for cmd in ("finetune", "generate", "pretrain", "evaluate", "run", "make-downstream")
      for kind in ("file", "under-a-file", "read-only")],
    *[("generate", "--classes", kind) for kind in ("missing", "empty-dir", "file")],
    *[("generate", "--config", kind) for kind in ("missing", "empty-dir", "under-a-file")],
    *[("generate", "--lora", kind) for kind in ("missing", "file", "empty-dir")],
    *[("pretrain", "--data", kind) for kind in ("missing", "file", "empty-dir")],
    *[("evaluate", "--backbone", kind) for kind in ("missing", "file", "empty-dir")],
    *[("evaluate", "--downstream", kind) for kind in ("missing", "file", "empty-dir")],
]


@pytest.mark.parametrize("command, flag, kind", PATH_CASES, ids=["-".join(c) for c in PATH_CASES])
def test_bad_paths_are_refused_before_ray_naming_the_path(inputs, request, tmp_path, cli_until_ray, command, flag, kind):
    bad = bad_path(inputs, kind, request)
    args = {"--output": str(tmp_path / "out"), "--data": str(inputs / "shards"), "--backbone": "random:test_resnet",
            "--downstream": str(inputs / "shapes")}
    wanted = {"pretrain": ["--output", "--data"], "evaluate": ["--output", "--backbone", "--downstream"]}.get(command, ["--output"])
    args = {f: args[f] for f in wanted}
    args[flag] = str(bad)
    before = files_under(inputs)
    code, err = cli_until_ray([command] + [x for f, v in args.items() for x in (f, v)])
    assert_refused(code, err, str(bad))
    assert files_under(inputs) == before and not (tmp_path / "out").exists()
    if flag == "--output":
        assert not bad.exists() or bad.is_file()


# ---------------------------------------------------------------- untrusted files (item 5)


class Payload:
    """Unpickling this creates `marker`: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant(path: Path, marker: Path) -> None:
    """A pickle that runs code when unpickled, under a name lbgen loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"state": Payload(marker)}, f)


def test_the_payload_runs_when_unpickled(tmp_path):
    """The planted file is a real threat: plain unpickling runs it (so the tests below can fail)."""
    plant(tmp_path / "x.pt", tmp_path / "ran")
    pickle.loads((tmp_path / "x.pt").read_bytes())
    assert (tmp_path / "ran").exists()


def test_pretrain_resume_refuses_a_pickled_train_state(tmp_path, tiny_cfg):
    from lbgen.runtime.training import CheckpointError
    from lbgen.stages.pretrain import TRAIN_STATE_FILE, Pretrainer

    trainer = Pretrainer(tiny_cfg(), num_classes=10, steps_per_epoch=2)
    trainer.save(tmp_path, epoch=1)
    assert Pretrainer(tiny_cfg(), num_classes=10, steps_per_epoch=2).load(tmp_path) == 1  # a real checkpoint loads
    plant(tmp_path / TRAIN_STATE_FILE, tmp_path / "ran")
    with pytest.raises(CheckpointError, match=f"{TRAIN_STATE_FILE} refused") as err:
        trainer.load(tmp_path)
    assert "\n" not in str(err.value) and not (tmp_path / "ran").exists()


def test_finetune_resume_refuses_a_pickled_optimizer_state(tmp_path, tiny_cfg):
    from lbgen.runtime.training import CheckpointError
    from lbgen.stages.finetune import OPTIM_FILE, Finetuner

    finetuner = Finetuner(tiny_cfg())
    finetuner.save(tmp_path, step=3)
    plant(tmp_path / OPTIM_FILE, tmp_path / "ran")
    with pytest.raises(CheckpointError, match=f"{OPTIM_FILE} refused"):
        finetuner.load(tmp_path)
    (tmp_path / "adapter.bin").write_bytes(b"")
    plant(next(tmp_path.glob("*.safetensors")), tmp_path / "ran")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        finetuner.load(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_evaluate_refuses_a_pickled_backbone(tmp_path, cli_until_ray, inputs):
    import timm

    from lbgen.models.backbones import export_backbone

    export = tmp_path / "pretrain"
    export_backbone(timm.create_model("test_resnet", num_classes=2), export, timm_name="test_resnet", class_ids=["a", "b"],
                    class_names=["a", "b"], image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    argv = ["evaluate", "--backbone", str(export), "--downstream", str(inputs / "shapes"), "--output", str(tmp_path / "out")]
    assert cli_until_ray(argv)[0] == "ray"
    plant(export / "backbone.safetensors", tmp_path / "ran")
    assert_refused(*cli_until_ray(argv), "backbone.safetensors: not a safetensors file")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_generate_refuses_a_pickled_lora_and_never_falls_back_to_bin(tmp_path, cli_until_ray):
    from lbgen.stages.generate import GenerateBatch, LoraError

    lora = tmp_path / "lora"
    plant(lora / "pytorch_lora_weights.safetensors", tmp_path / "ran")
    plant(lora / "pytorch_lora_weights.bin", tmp_path / "ran")
    assert_refused(*cli_until_ray(["generate", "--lora", str(lora), "--output", str(tmp_path / "out")]), "unreadable")
    cfg = resolve("tiny", overrides={"generate": {"lora": str(lora)}})
    with pytest.raises(LoraError, match="cannot be loaded"):  # the actor's own load, past the driver's check
        GenerateBatch(dataclasses.asdict(cfg))
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_pyiqa_weights_load_weights_only(tmp_path, monkeypatch):
    """pyiqa itself unpickles its weights fully (weights_only=False); create_iqa forces weights_only."""
    import pyiqa.utils.download_util as download

    from lbgen.models.hub import UnsafeWeightsError
    from lbgen.models.iqa import create_iqa

    monkeypatch.setattr(download, "DEFAULT_CACHE_DIR", str(tmp_path))
    plant(tmp_path / "CNNIQA_koniq10k-e6f14c91.pth", tmp_path / "ran")  # where pyiqa looks before downloading
    with pytest.raises(UnsafeWeightsError, match="'cnniqa' refused"):
        create_iqa("cnniqa")
    assert not (tmp_path / "ran").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the load


def test_remote_code_is_off_unless_the_flag_is_given():
    import re

    import pyiqa
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    from lbgen.models.iqa import REMOTE_CODE_METRICS, create_iqa

    # Metric types whose pyiqa architecture file loads with trust_remote_code=True.
    remote_types = set()
    for source in (Path(pyiqa.__file__).parent / "archs").glob("*.py"):
        text = source.read_text()
        if re.search(r"trust_remote_code['\"]?\s*[:=]\s*True", text):
            remote_types |= set(re.findall(r"^class (\w+)\(", text, re.MULTILINE))
    runs_remote = {name for name, c in DEFAULT_CONFIGS.items() if c["metric_opts"]["type"] in remote_types}
    assert runs_remote and runs_remote <= REMOTE_CODE_METRICS
    for name in sorted(REMOTE_CODE_METRICS):
        with pytest.raises(PermissionError, match="--trust-remote-code"):
            create_iqa(name)
    assert Config().model.trust_remote_code is False and resolve("tiny").model.trust_remote_code is False
    args = cli.build_parser().parse_args(["generate", "--trust-remote-code"])
    assert resolve("tiny", overrides=cli.overrides_from_args(args)).model.trust_remote_code is True


def test_every_place_that_builds_the_iqa_model_passes_the_trust_setting_on(monkeypatch):
    import dataclasses

    import lbgen.models
    import lbgen.stages.finetune
    from lbgen.models.iqa import create_iqa
    from lbgen.stages.generate import ScoreBatch

    asked = []

    def spy(name, **kwargs):
        asked.append(kwargs.get("trust_remote_code"))
        return create_iqa(name, **kwargs)

    monkeypatch.setattr(lbgen.stages.finetune, "create_iqa", spy)
    monkeypatch.setattr(lbgen.models, "create_iqa", spy)
    for trust in (True, False):
        asked.clear()
        cfg = resolve("tiny", overrides={"model": {"trust_remote_code": trust}})
        lbgen.stages.finetune.check_quality_loss(cfg)  # the driver's gradient probe
        lbgen.stages.finetune.Finetuner(cfg)  # fine-tuning workers
        ScoreBatch(dataclasses.asdict(cfg))  # generation's scoring actors
        assert asked == [trust] * 3


# ---------------------------------------------------------------- disk full (item 6)


def tmpfs(path: Path, size_kib: int, remount: bool = False) -> bool:
    options = f"{'remount,' if remount else ''}size={size_kib}k"
    cmd = ["mount", "-o", options, str(path)] if remount else ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    return os.geteuid() == 0 and subprocess.run(cmd, capture_output=True, check=False).returncode == 0


@pytest.mark.ray
@pytest.mark.slow
def test_disk_full_stops_generate_keeping_whole_shards_and_resume_completes(tmp_path, capsys, ray_local):
    """A real size-limited tmpfs: the parts and shards are written by Ray's workers, out of reach of a patch here."""
    import numpy as np
    from PIL import Image

    from lbgen.data.reader import inspect_dataset
    from lbgen.stages.generate import GenerateBatch, generate, plan

    table = tmp_path / "three.txt"
    table.write_text("n1 tench\nn2 goldfish\nn3 shark\n")
    argv = ["generate", "--preset", "tiny", "--classes", str(table), "--images-per-class", "2", "--rows-per-shard", "1", "--batch-size", "2",
            "--address", ray_local.get_runtime_context().gcs_address]
    full = tmp_path / "full"
    full.mkdir()
    # Card, config and manifest (about 10 KiB, a temp copy of the manifest beside it), then ~17 KiB shards, each
    # written from its part (a shard and its part on disk at once): full after 2 to 5 shards.
    if not tmpfs(full, 130):
        pytest.skip("mounting a size-limited tmpfs needs root")
    output = full / "ds"
    try:
        capsys.readouterr()
        code = cli.main(argv + ["--output", str(output)])
        err = "\n".join(line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if not line.startswith("generate:"))
        assert_refused(code, err, "no space left on device writing train-", "complete shard(s) there are kept",
                       "free space and re-run the same command to resume")
        kept = {p.name: p.read_bytes() for p in (output / "data").glob("train-*.parquet")}
        assert 1 <= len(kept) < 6, sorted(kept)
        hidden = [p.relative_to(output) for p in output.rglob(".*")]
        assert hidden in ([], [Path(".parts")]), hidden  # no temp shard, part or manifest; parts that the re-run drops
        manifest = json.loads((output / "manifest.json").read_text())
        assert set(manifest["shards"]) <= set(kept)  # the manifest never claims a shard that is not whole
        for name in kept:
            assert pq.read_metadata(output / "data" / name).num_rows == 1

        assert tmpfs(full, 4096, remount=True)  # space freed
        cfg = resolve("tiny", overrides={"classes": str(table), "generate": {
            "images_per_class": 2, "rows_per_shard": 1, "batch_size": 2, "output": str(output)}})
        resumed = generate(cfg, show_progress=False)
        assert resumed["throughput"]["images_this_run"] == 6 - len(kept)
        assert all((output / "data" / name).read_bytes() == data for name, data in kept.items())  # kept untouched
        assert not list(output.rglob(".*"))  # the stopped run's parts were dropped, then every new part used
        assert inspect_dataset(output).ok
        # The same dataset an uninterrupted run makes: every row re-made alone from the plan.
        rows = sorted(pq.read_table(output / "data").to_pylist(), key=lambda r: (r["label"], r["index"]))
        planned = sorted(plan(load_class_table(table), cfg), key=lambda r: (r["label"], r["index"]))
        batch = {k: np.array([r[k] for r in planned]) for k in ("seed", "prompt")}
        remade = GenerateBatch(dataclasses.asdict(cfg))(batch)["pixels"]
        for row, want, pixels in zip(rows, planned, remade):
            assert (row["label"], row["index"], row["seed"]) == (want["label"], want["index"], want["seed"])
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))), pixels)
    finally:
        subprocess.run(["umount", str(full)], check=False)
    print(f"disk full: {len(kept)} of 6 shards kept, resumed to 6")


# ---------------------------------------------------------------- one writer per output


@pytest.mark.parametrize("command, flag", [("generate", "--output"), ("finetune", "--output"), ("pretrain", "--output")])
def test_an_output_in_use_is_refused_before_ray_and_a_stale_one_is_taken(command, flag, tmp_path, cli_until_ray, caplog):
    """A second command on an output another command holds is refused in one line naming the holder;
    once that holder is killed, its lock is reported stale and the command goes on."""
    from shape_shards import write_shape_shards

    from lbgen.data.classes import load_class_table

    output = tmp_path / "out"
    hold = "import sys, time\nfrom lbgen.runtime.locks import OutputLock\nwith OutputLock(sys.argv[1], 'lbgen first'):\n" \
           "    print('held', flush=True)\n    time.sleep(600)\n"
    proc = subprocess.Popen([sys.executable, "-c", hold, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        argv = [command, flag, str(output)]
        if command == "pretrain":
            argv += ["--data", str(write_shape_shards(tmp_path / "shards", load_class_table("tiny10"), per_class=4, size=16))]
        assert_refused(*cli_until_ray(argv), f"{output} is in use by `lbgen first` (pid {proc.pid} on ")
        proc.kill()
        proc.wait()
        with caplog.at_level(logging.WARNING, logger="lbgen.runtime.locks"):
            code, err = cli_until_ray(argv)
        assert code == "ray", err
        assert any("`lbgen first`" in r.message and "is stale" in r.message for r in caplog.records)
    finally:
        proc.kill()
        proc.wait()
