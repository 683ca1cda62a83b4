"""`lbgen generate` on the tiny preset: plan, one generation code path, Ray Data runs, resume, bad input."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from configs import tiny_generate
from PIL import Image
from rows import assert_same_dataset, read_rows

from lbgen.cli import main as cli_main
from lbgen.config import Config, ConfigError, FaultConfig, resolve
from lbgen.data.classes import ClassTableError, load_class_table
from lbgen.data.images import encode_images
from lbgen.data.reader import inspect_dataset
from lbgen.runtime.storage import locate
from lbgen.data.writer import claim_output
from lbgen.errors import DatasetError
from lbgen.stages.generate import (
    GenerateBatch,
    LoraError,
    ScoreBatch,
    check_lora,
    generate,
    generator_id,
    plan,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray"]
PER_CLASS = 4  # 6 classes x 4 = 24 rows; 2 rows per shard = 12 shards


@pytest.fixture(scope="module")
def table_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("classes") / "six.txt"
    path.write_text("".join(f"n{i:08d} {name}\n" for i, name in enumerate(CLASSES)))
    return path


# The tiny preset on a class table file, into an output directory.
tiny_cfg = partial(tiny_generate, images_per_class=PER_CLASS)


# ---------------------------------------------------------------- the generation callable, called directly


@pytest.fixture(scope="module")
def generator(table_file, tmp_path_factory):
    cfg = tiny_cfg(table_file, tmp_path_factory.mktemp("unused"))
    return cfg, GenerateBatch(dataclasses.asdict(cfg))


def batch_of(rows: list[dict]) -> dict:
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.slow
def test_generate_batch_pixels_do_not_depend_on_batching(generator, table_file):
    """Batches larger than, not a multiple of, and smaller than the micro-batch give the same pixels."""
    cfg, gen = generator
    assert cfg.generate.micro_batch == 4
    rows = plan(load_class_table(str(table_file)), cfg)[:12]
    whole = gen(batch_of(rows))["pixels"]  # three model calls of 4
    assert whole.shape == (12, 64, 64, 3) and whole.dtype == np.uint8
    fives = np.concatenate([gen(batch_of(rows[i : i + 5]))["pixels"] for i in range(0, 12, 5)])
    alone = np.stack([gen(batch_of([r]))["pixels"][0] for r in rows])
    np.testing.assert_array_equal(whole, fives)
    np.testing.assert_array_equal(whole, alone)
    assert not np.array_equal(whole[0], whole[1])  # different seeds, different images


def test_score_and_encode(generator, table_file):
    cfg, gen = generator
    rows = plan(load_class_table(str(table_file)), cfg)[:3]
    scored = ScoreBatch(dataclasses.asdict(cfg))(gen(batch_of(rows)))
    assert scored["clip_score"].shape == (3,) and np.all(np.abs(scored["clip_score"]) <= 1.0001)
    assert scored["clip_agrees"].dtype == bool and np.isfinite(scored["iqa_score"]).all()
    for fmt in ("png", "jpeg", "webp"):
        out = encode_images(dict(scored), fmt, 90)
        decoded = np.asarray(Image.open(io.BytesIO(out["image_bytes"][0])))
        assert decoded.shape == (64, 64, 3) and "pixels" not in out and out["image_path"][0].endswith((fmt, "jpg"))
        if fmt == "png":
            np.testing.assert_array_equal(decoded, scored["pixels"][0])


def make_lora(directory: Path) -> Path:
    """A diffusers-format LoRA for the tiny UNet with non-zero weights (peft's gaussian init leaves B = 0)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from lbgen.models import create_generator

    pipe = create_generator("tiny", resolution=64)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=state, safe_serialization=True)
    return directory


def test_lora_is_applied(generator, table_file, tmp_path):
    cfg, gen = generator
    lora_cfg = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, lora=str(make_lora(tmp_path))))
    rows = batch_of(plan(load_class_table(str(table_file)), cfg)[:2])
    with_lora = GenerateBatch(dataclasses.asdict(lora_cfg))(rows)["pixels"]
    assert not np.array_equal(with_lora, gen(rows)["pixels"])
    sha = check_lora(lora_cfg.generate.lora)
    assert generator_id(lora_cfg, sha) == f"tiny+lora:sha256:{sha}" and len(sha) == 64


# ---------------------------------------------------------------- Ray Data runs


@pytest.fixture(scope="module")
def full_run(ray_local, table_file, tmp_path_factory):
    """One uninterrupted run: 1 actor, batch 2."""
    output = tmp_path_factory.mktemp("full") / "ds"
    manifest = generate(tiny_cfg(table_file, output, workers=1, batch_size=2), show_progress=False)
    return output, manifest


def test_full_run_rows_and_manifest(full_run, table_file):
    output, manifest = full_run
    rows = read_rows(output)
    assert len(rows) == len(CLASSES) * PER_CLASS == manifest["totals"]["rows"]
    assert set(rows) == {(c, i) for c in range(len(CLASSES)) for i in range(PER_CLASS)}
    assert all(r["class_name"] == CLASSES[r["label"]] and r["generator"] == "tiny" for r in rows.values())
    names = sorted(p.name for p in (output / "data").iterdir())
    assert names == [f"train-{k:05d}-of-00012.parquet" for k in range(12)]
    assert pq.ParquetFile(output / "data" / names[0]).metadata.num_row_groups == 1
    assert manifest["throughput"]["images_this_run"] == 24
    assert (manifest["device"], manifest["precision"]) == ("cpu", "fp32")  # how the images were made
    found = inspect_dataset(output)
    assert found.ok, found.defects
    assert found.summary["rows"] == 24


def test_generation_leaves_ray_datas_global_settings_as_it_found_them(full_run):
    """Generation orders its own rows and hides Ray Data's bars on its dataset only: in `lbgen run`, pre-training's
    ingest in the same process keeps Ray Data's defaults (unordered, its own progress)."""
    import ray.data

    defaults, ctx = ray.data.DataContext(), ray.data.DataContext.get_current()
    assert ctx.execution_options.preserve_order == defaults.execution_options.preserve_order
    assert ctx.enable_progress_bars == defaults.enable_progress_bars
    assert logging.getLogger("ray.data").level != logging.ERROR  # its warnings were silenced for the run only


def test_image_remade_alone_equals_full_run(full_run, generator, table_file):
    output, _ = full_run
    cfg, gen = generator
    rows = read_rows(output)
    for row in plan(load_class_table(str(table_file)), cfg)[5:8]:
        np.testing.assert_array_equal(gen(batch_of([row]))["pixels"][0], rows[(row["label"], row["index"])]["pixels"])


@pytest.mark.slow
def test_two_actors_batch_four_equals_one_actor_batch_two(full_run, table_file, tmp_path):
    output, _ = full_run
    generate(tiny_cfg(table_file, tmp_path / "ds", workers=2, batch_size=4), show_progress=False)
    assert_same_dataset(output, tmp_path / "ds")


@pytest.mark.slow
def test_a_separate_scoring_pool_makes_the_same_dataset(full_run, table_file, tmp_path):
    """Scoring beside generation (the default) and in its own pool of actors give the same images and the same
    scores (within float32 rounding; the float16 embedding within its last bits: tests/rows.py)."""
    output, _ = full_run
    generate(tiny_cfg(table_file, tmp_path / "ds", workers=2, batch_size=4, score_beside=False), show_progress=False)
    assert_same_dataset(output, tmp_path / "ds")


@pytest.mark.slow
def test_the_driver_writes_no_shard_and_receives_no_image(full_run, table_file, tmp_path, monkeypatch):
    """Workers write the parts and assemble the shards; the driver gets a row of metadata per part and only commits.
    In this process (the driver) writing a shard or a part fails, yet the run makes the full run's dataset."""
    import lbgen.data.writer as writer_module

    def not_here(*args, **kwargs):
        raise AssertionError("the driver wrote a shard or a part")

    monkeypatch.setattr(writer_module, "write_shard", not_here)
    received = []
    add_parts = writer_module.DatasetWriter.add_parts
    monkeypatch.setattr(writer_module.DatasetWriter, "add_parts",
                        lambda self, meta: received.append({k: v.nbytes for k, v in meta.items()}) or add_parts(self, meta))
    output, _ = full_run
    generate(tiny_cfg(table_file, tmp_path / "ds", workers=2, batch_size=4), show_progress=False)
    assert_same_dataset(output, tmp_path / "ds")
    assert {key for meta in received for key in meta} == {"shard", "part", "rows", "embedding_dim", "error"}
    assert sum(sum(meta.values()) for meta in received) / 24 < 100  # bytes per image reaching the driver
    assert not (tmp_path / "ds" / ".parts").exists()


def test_rerun_skips_finished_shards(full_run, table_file):
    output, manifest = full_run
    again = generate(tiny_cfg(table_file, output), show_progress=False)
    assert again["throughput"]["images_this_run"] == 0 and again["shards"] == manifest["shards"]


def test_load_dataset_gives_pil_images_and_int_labels(full_run, ray_local):
    datasets = pytest.importorskip("datasets")
    output, _ = full_run
    for ds in (datasets.load_dataset("parquet", data_dir=str(output))["train"], datasets.load_dataset(str(output))["train"]):
        assert len(ds) == 24
        assert isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].size == (64, 64)
        assert isinstance(ds[0]["label"], int)
        assert ds.features["label"].names == CLASSES
        assert len(ds[0]["clip_embedding"]) == json.loads((output / "manifest.json").read_text())["embedding_dim"] == 32
    assert ray_local.data.read_parquet(str(output / "data")).count() == 24
    assert __import__("pandas").read_parquet(output / "data").shape == (24, 14)


def final_shards(output: Path) -> set[str]:
    data = output / "data"
    return {p.name for p in data.glob("train-*.parquet")} if data.is_dir() else set()


def run_and_kill(cmd: list[str], output: Path, new_shards: int, delay: float) -> bool:
    """Run `cmd`; SIGKILL it `delay` s after it wrote `new_shards` shards (0: after its start). True if killed.

    Every 20 ms, checks that each shard visible under a final name is whole; False if it finished first.
    """
    seen = before = final_shards(output)
    log = output.parent / "generate-stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "PYTHONPATH": str(REPO)})
    kill_at = time.time() + delay if new_shards == 0 else None
    deadline = time.time() + 180
    try:
        while proc.poll() is None and time.time() < deadline:
            for name in final_shards(output) - seen:
                assert pq.read_metadata(output / "data" / name).num_rows == 2  # whole the moment it is visible
                seen = seen | {name}
            if kill_at is None and len(seen - before) >= new_shards:
                kill_at = time.time() + delay
            if kill_at is not None and time.time() >= kill_at:
                proc.send_signal(signal.SIGKILL)
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    errors = [line for line in log.read_text().splitlines() if "error" in line.lower()]
    assert proc.returncode in (0, -signal.SIGKILL), f"lbgen generate failed with {proc.returncode}: {errors[-3:]}"
    return proc.returncode == -signal.SIGKILL


def assert_manifest_matches_disk(output: Path) -> None:
    """After a kill: the manifest (if any) records only whole shards that are on disk with its sha256."""
    from lbgen.data.reader import read_manifest, sha256_file

    manifest = read_manifest(output) if (output / "manifest.json").exists() else {"shards": {}}
    for name, entry in manifest["shards"].items():
        assert sha256_file(output / "data" / name) == entry["sha256"], name
    for name in final_shards(output):
        assert pq.read_metadata(output / "data" / name).num_rows == 2


# Three kills, one per stratum of a run, each at a point drawn from a seeded RNG: before any shard (imports,
# Ray attach, output claimed, actors starting), among the first shards, among the last. Each kill lands in
# the re-run of the run killed before it, so the later runs also resume from a killed run's leftovers.
KILL_STRATA = [(0, 0), (1, 5), (6, 11)]  # shards on disk when the kill's clock starts


def driver_kills(root: Path) -> dict:
    """Scenario `generate-driver-kills` (tests/scenarios.py), in its own process with its own Ray: SIGKILL a
    real `lbgen generate` at seeded random points, three times over (`KILL_STRATA`). Every 20 ms of each run,
    and after each kill, it asserts that no partial shard is visible under a final name and that the manifest
    matches the disk; then it resumes in-process. Returns the output, what each kill left and the resume."""
    from scenarios import local_ray

    table, output = root / "six.txt", root / "ds"
    table.write_text("".join(f"n{i:08d} {name}\n" for i, name in enumerate(CLASSES)))
    kills = []
    with local_ray() as ray:
        cmd = [sys.executable, "-m", "lbgen.cli", "generate", "--preset", "tiny", "--classes", str(table),
               "--images-per-class", str(PER_CLASS), "--rows-per-shard", "2", "--row-group-rows", "2", "--batch-size", "2",
               "--output", str(output), "--address", ray.get_runtime_context().gcs_address]
        rng = random.Random(4)  # its last kill falls early in the last stratum: the final resume has shards to make
        for shards_from, shards_to in KILL_STRATA:
            new_shards = max(0, rng.randint(shards_from, shards_to) - len(final_shards(output)))
            # Drawn by stratum, not by what is on disk, so the seed fixes every draw: seconds after the process
            # start before any shard, a fraction of a second after the shards later.
            delay = rng.uniform(0, 6) if shards_to == 0 else rng.uniform(0, 0.3)
            killed = run_and_kill(cmd, output, new_shards, delay)
            assert_manifest_matches_disk(output)
            kills.append({"new_shards": new_shards, "delay_s": round(delay, 2), "killed": killed,
                          "shards_left": len(final_shards(output)), "inspect_ok": inspect_dataset(output).ok})
        resumed = generate(tiny_cfg(table, output), show_progress=False)["throughput"]["images_this_run"]
    return {"output": str(output), "kills": kills, "images_resumed": resumed,
            "hidden_files_left": [str(p) for p in output.rglob(".*")]}


SCENARIOS = {"generate-driver-kills": driver_kills}


@pytest.mark.slow
@pytest.mark.scenario("generate-driver-kills")
def test_driver_killed_at_random_points_resumes_to_the_same_dataset(full_run, scenario):
    """SIGKILL a real `lbgen generate` at seeded random points, three times over, each kill landing in the
    re-run of the run killed before it; no partial shard is ever visible under a final name; the resumed
    dataset equals the uninterrupted run."""
    output = Path(scenario["output"])
    for kill in scenario["kills"]:
        print(f"killed {kill['delay_s']:.2f}s after {kill['new_shards']} new shard(s): {kill['shards_left']}/12 shards on disk")
        assert kill["killed"], "the run finished before the kill"
        assert kill["shards_left"] == 12 or not kill["inspect_ok"]  # an incomplete dataset is reported as such
    survived = scenario["kills"][-1]["shards_left"]
    assert scenario["images_resumed"] == 24 - 2 * survived  # only the missing shards
    assert not scenario["hidden_files_left"]  # no temp shard or manifest left behind
    assert_same_dataset(full_run[0], output)
    assert cli_main(["inspect", str(output)]) == 0


@pytest.mark.slow
def test_generation_actor_killed_mid_batch_is_replaced(full_run, table_file, tmp_path, ray_local):
    """A GenerateBatch actor dies hard in its 3rd batch: Ray restarts it and retries the batch; nothing is
    lost or doubled."""
    marker = tmp_path / "actor-died"
    cfg = tiny_cfg(table_file, tmp_path / "ds", workers=1, batch_size=2)
    cfg = dataclasses.replace(cfg, fault=FaultConfig(point="generate.batch", after=3, marker=str(marker)))
    manifest = generate(cfg, show_progress=False)
    assert marker.exists()  # the actor did die
    assert manifest["throughput"]["images_this_run"] == manifest["totals"]["rows"] == 24
    assert_same_dataset(full_run[0], tmp_path / "ds")
    assert inspect_dataset(tmp_path / "ds").ok


def test_inspect_reports_defects(full_run, tmp_path, capsys):
    copy = tmp_path / "ds"
    shutil.copytree(full_run[0], copy)
    assert cli_main(["inspect", str(copy)]) == 0
    shard = copy / "data" / "train-00003-of-00012.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    (copy / "data" / "train-00005-of-00012.parquet").unlink()
    assert cli_main(["inspect", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "train-00003-of-00012.parquet: sha256" in err and "train-00005-of-00012.parquet: missing" in err
    assert "class(es) without 4 images" in err


# ---------------------------------------------------------------- bad input: clear errors, nothing overwritten


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_malformed_class_table(tmp_path, capsys, ray_local):  # the CLI attaches to the test's Ray
    bad = tmp_path / "bad.txt"
    bad.write_text("n01 tench\nlonely\n")
    with pytest.raises(ClassTableError, match=r"bad.txt:2"):
        generate(tiny_cfg(bad, tmp_path / "out"))
    assert cli_main(["generate", "--preset", "tiny", "--classes", str(bad), "--output", str(tmp_path / "out")]) == 2
    assert "bad.txt:2" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [None, b"not a safetensors file"])
def test_unreadable_lora(tmp_path, table_file, content, capsys, ray_local):
    lora = tmp_path / "lora"
    lora.mkdir()
    if content is not None:
        (lora / "pytorch_lora_weights.safetensors").write_bytes(content)
    with pytest.raises(LoraError, match="LoRA"):
        generate(tiny_cfg(table_file, tmp_path / "out", lora=str(lora)))
    assert cli_main(["generate", "--preset", "tiny", "--classes", str(table_file), "--lora", str(lora), "--output", str(tmp_path / "out")]) == 2
    assert str(lora) in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_output_holding_another_dataset_is_refused(full_run, table_file, tmp_path):
    output = full_run[0]
    before = snapshot(output)
    with pytest.raises(DatasetError, match=r"other settings.*seed: 0 -> 7"):
        generate(dataclasses.replace(tiny_cfg(table_file, output), seed=7))
    with pytest.raises(DatasetError, match="images_per_class: 4 -> 5"):
        generate(tiny_cfg(table_file, output, images_per_class=5))
    assert snapshot(output) == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="holds no manifest.json"):
        generate(tiny_cfg(table_file, foreign))
    assert snapshot(foreign) == {Path("notes.txt"): b"keep me"}


def test_output_left_by_a_run_killed_while_claiming_it_is_taken(tmp_path):
    """A run killed inside its first manifest write leaves only the temp manifest: the next run uses the directory."""
    output = tmp_path / "ds"
    output.mkdir()
    (output / ".manifest.json.tmp-0a1b2c3d").write_text('{"format": "lbg')
    assert claim_output(locate(output), {"seed": 0}, overwrite=False) is None
    assert list(output.iterdir()) == []
    (output / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="holds no manifest.json"):
        claim_output(locate(output), {"seed": 0}, overwrite=False)


@pytest.mark.parametrize("name", ["/nonexistent/sd15", "nobody-xyz/no-such-model"])
def test_missing_generator_fails_fast_before_writing(tmp_path, table_file, name, capsys, monkeypatch, ray_local):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub id must not be fetched: answer at once
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    assert cli_main(["generate", "--preset", "tiny", "--classes", str(table_file), "--generator", name, "--output", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - start < 10
    assert f"generator {name!r} was not found" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_non_positive_images_per_class(tmp_path, capsys):
    for n in (0, -3):
        with pytest.raises(ConfigError, match="generate.images_per_class must be > 0"):
            resolve("tiny", overrides={"generate": {"images_per_class": n}})
        assert cli_main(["generate", "--preset", "tiny", "--images-per-class", str(n), "--output", str(tmp_path / "out")]) == 2
    assert "images_per_class must be > 0" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- config, CLI, presets


def test_cli_flags_reach_the_generate_config():
    from lbgen.cli import build_parser
    from lbgen.cli.flags import overrides_from_args

    args = build_parser().parse_args(
        ["generate", "--classes", "tiny10", "--lora", "L", "--images-per-class", "3", "--output", "O", "--seed", "5",
         "--workers", "2", "--batch-size", "3", "--steps", "7", "--scheduler", "ddim", "--guidance", "1.5",
         "--image-format", "webp", "--overwrite"])
    cfg = resolve(args.preset, None, overrides_from_args(args))
    gen = cfg.generate
    assert (cfg.seed, gen.lora, gen.images_per_class, gen.output, gen.workers, gen.batch_size, gen.steps,
            gen.scheduler, gen.guidance, gen.image_format, gen.overwrite) == (5, "L", 3, "O", 2, 3, 7, "ddim", 1.5, "webp", True)
    args = build_parser().parse_args(["generate", "--concurrency", "3"])
    assert resolve(args.preset, None, overrides_from_args(args)).generate.workers == 3


def test_paper_defaults_and_validation():
    gen = Config().generate
    assert (gen.images_per_class, gen.steps, gen.guidance, gen.scheduler, gen.prompt_template) == (1300, 50, 2.0, "ddpm", "{name}")
    assert Config().model.resolution == 512
    for field, value, message in [("image_format", "gif", "image_format"), ("steps", 0, "steps must be > 0"),
                                  ("prompt_template", "a photo", "must contain"), ("dtype", "int8", "dtype")]:
        with pytest.raises(ConfigError, match=message):
            resolve("tiny", overrides={"generate": {field: value}})


def test_sd15_shape_preset_builds_the_real_architectures():
    """SD 1.5 UNet/VAE/text encoder and CLIP ViT-L/14 parameter counts, built on the meta device (no memory)."""
    import open_clip
    import torch

    from lbgen.models.generator import GENERATOR_BUILDERS

    cfg = resolve("sd15-shape")
    assert (cfg.model.generator, cfg.model.clip, cfg.model.clip_pretrained, cfg.model.resolution) == ("sd15-shape", "ViT-L-14", None, 512)
    with torch.device("meta"):
        pipe = GENERATOR_BUILDERS[cfg.model.generator](resolution=512)
        clip = open_clip.CLIP(**open_clip.get_model_config(cfg.model.clip))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (count(pipe.unet), count(pipe.vae), count(pipe.text_encoder)) == (859_520_964, 83_653_863, 123_060_480)
    assert count(clip) == 427_616_513


@pytest.mark.slow
def test_overwrite_replaces_only_what_generate_wrote(full_run, table_file, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(full_run[0], copy)
    (copy / "notes.txt").write_text("keep me")
    manifest = generate(tiny_cfg(table_file, copy, images_per_class=1, overwrite=True), show_progress=False)
    assert manifest["totals"]["rows"] == len(CLASSES) and manifest["images_per_class"] == 1
    assert sorted(p.name for p in (copy / "data").iterdir()) == [f"train-{k:05d}-of-00003.parquet" for k in range(3)]
    assert (copy / "notes.txt").read_text() == "keep me" and inspect_dataset(copy).ok


def test_scores_equal_an_independent_computation():
    """`ScoreBatch`'s clip_score, clip_agrees and iqa_score on a few rows equal the same quantities computed here
    from the factories' networks alone: normalisation, tokenising, cosine, own-class pick, zero-shot ranking and
    the IQA forward written out apart from lbgen's scoring code. Pre-training filters on these columns."""
    import open_clip
    import torch

    from lbgen.models import create_clip, create_iqa

    cfg = resolve("tiny")
    table = load_class_table(cfg.classes)
    pixels = np.random.default_rng(0).integers(0, 256, (3, cfg.model.resolution, cfg.model.resolution, 3), dtype=np.uint8)

    clip = create_clip(cfg.model.clip, cfg.model.clip_pretrained, seed=cfg.seed).model
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # the tiny CLIP's own 64 px: no resize
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD))
    with torch.no_grad():
        image_features = clip.encode_image((images - mean) / std).numpy()
        prompts = [cfg.generate.score_template.format(name=name) for name in table.names]
        text_features = clip.encode_text(open_clip.get_tokenizer("ViT-B-32")(prompts)).numpy()
        iqa = create_iqa(cfg.model.iqa, seed=cfg.seed).metric(images).reshape(3).numpy()
    cosines = (image_features / np.linalg.norm(image_features, axis=1, keepdims=True)) @ \
        (text_features / np.linalg.norm(text_features, axis=1, keepdims=True)).T  # (3, classes)
    best = cosines.argmax(axis=1)
    labels = np.array([best[0], best[1], (best[2] + 1) % len(table)])  # two rows CLIP agrees with, one it does not

    scored = ScoreBatch(dataclasses.asdict(cfg))({"pixels": pixels, "label": labels})
    np.testing.assert_allclose(scored["clip_score"], cosines[np.arange(3), labels], atol=1e-5)
    assert scored["clip_agrees"].tolist() == [True, True, False]
    np.testing.assert_allclose(scored["iqa_score"], iqa, atol=1e-5)
