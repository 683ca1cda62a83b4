import argparse

import pytest

from lbgen.cli.flags import add_config_flags, overrides_from_args
from lbgen.config import PRESETS, Config, ConfigError, from_dict, leaf_fields, resolve, to_yaml


def test_defaults_are_the_paper_setup():
    cfg = resolve("sd15-in1k")
    ft = cfg.finetune
    assert (ft.num_steps, ft.grad_steps, ft.guidance, ft.lora_rank, ft.lora_alpha) == (50, 5, 2.0, 128, 128)
    assert (ft.lr, ft.d_lr, ft.w_en, ft.w_in, ft.lambda_q) == (2e-5, 1e-5, 1.0, 1.0, 0.1)
    assert cfg.model.generator == "sd-legacy/stable-diffusion-v1-5"
    assert (cfg.model.clip, cfg.model.clip_pretrained) == ("ViT-L-14", "openai")
    assert cfg.classes == "imagenet1k"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_resolve_and_round_trip_through_yaml(preset, tmp_path):
    cfg = resolve(preset)
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert resolve(preset, path) == cfg


def test_yaml_overrides_preset_and_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  lr: 0.5\n  batch_size: 3\nseed: 7\n")
    cfg = resolve("tiny", path, {"finetune": {"batch_size": 2}})
    assert (cfg.finetune.lr, cfg.finetune.batch_size, cfg.seed) == (0.5, 2, 7)
    assert cfg.model.generator == "tiny"  # from the preset


def test_cli_flags_cover_every_field_and_parse_types():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ("model", "finetune"))
    args = parser.parse_args(["--lr", "0.1", "--max-steps", "none", "--lora-targets", "to_q,to_v", "--no-gradient-checkpointing", "--seed", "3"])
    overrides = overrides_from_args(args)
    assert overrides == {
        "finetune": {"lr": 0.1, "max_steps": None, "lora_targets": ["to_q", "to_v"], "gradient_checkpointing": False},
        "seed": 3,
    }
    flags = {a.dest for a in parser._actions if a.dest.startswith("cfg:")}
    leaves = {"cfg:" + ".".join(path) for path, _, _ in leaf_fields(Config) if path[0] == "finetune"}
    assert leaves <= flags


@pytest.mark.parametrize(
    "text, needle",
    [
        ("finetune:\n  lrr: 1\n", "unknown key(s) lrr"),
        ("finetune:\n  batch_size: four\n", "finetune.batch_size: expected int"),
        ("finetune:\n  batch_size: -1\n", "finetune.batch_size must be > 0"),
        ("finetune:\n  w_in: -0.5\n", "finetune.w_in must be >= 0"),
        ("finetune:\n  grad_steps: 60\n", "must not exceed"),
        ("finetune:\n  clip_template: photo\n", "must contain '{name}'"),
        ("- a list\n", "expected a mapping"),
        ("finetune: [1, 2\n", "not valid YAML"),
        ("finetune:\n  cluster:\n    workers: 0\n", "finetune.cluster.workers must be > 0"),
        ("pretrain:\n  cluster:\n    mixed_precision: fp8\n", "pretrain.cluster.mixed_precision must be one of bf16, fp16, no"),
        ("finetune:\n  cluster:\n    max_failures: -2\n", "finetune.cluster.max_failures must be >= 0 or -1"),
        ("finetune:\n  workers: 2\n", "unknown key(s) workers"),
        ("pretrain:\n  cluster:\n    cpus_per_worker: .nan\n", "pretrain.cluster.cpus_per_worker: expected a finite number"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as err:
        resolve("tiny", path)
    assert needle in str(err.value)


def test_missing_config_file_and_unknown_preset():
    with pytest.raises(ConfigError, match="not found"):
        resolve("tiny", "/nonexistent/c.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve("nope")


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="expected int"):
        from_dict(Config, {"seed": True})


def test_a_config_file_names_its_preset_and_a_given_preset_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: sd15-in1k\nseed: 3\n")
    assert resolve(config_file=path) == resolve("sd15-in1k", overrides={"seed": 3})
    assert resolve("tiny", path) == resolve("tiny", overrides={"seed": 3})
    path.write_text("seed: 3\n")
    assert resolve(config_file=path) == resolve(overrides={"seed": 3})  # no preset anywhere: the paper's defaults
    assert resolve(config_file=path).model.generator == "sd-legacy/stable-diffusion-v1-5"
    path.write_text("preset: huge\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown preset 'huge'"):
        resolve(config_file=path)


# ---------------------------------------------------------------- the shared training cluster, resumable fields, registries


def test_training_cluster_is_one_dataclass_with_each_stages_defaults_and_flags():
    from lbgen.config import TrainCluster

    cfg = Config()
    assert type(cfg.finetune.cluster) is type(cfg.pretrain.cluster) is TrainCluster
    assert (cfg.finetune.cluster.cpus_per_worker, cfg.finetune.cluster.checkpoint_every) == (1.0, 50)
    assert (cfg.pretrain.cluster.cpus_per_worker, cfg.pretrain.cluster.checkpoint_every) == (2.0, 1)
    # A section's cluster given in part keeps that section's defaults for the rest.
    assert from_dict(Config, {"pretrain": {"cluster": {"workers": 4}}}).pretrain.cluster.checkpoint_every == 1
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ("pretrain",))
    args = parser.parse_args(["--workers", "4", "--no-use-gpu", "--cpus-per-worker", "0.5", "--mixed-precision", "no"])
    assert overrides_from_args(args) == {"pretrain": {"cluster": {"workers": 4, "use_gpu": False, "cpus_per_worker": 0.5,
                                                                  "mixed_precision": "no"}}}
    help_text = " ".join(parser.format_help().split())
    assert "[pretrain.cluster.cpus_per_worker; default: 2.0]" in help_text
    assert "Ray Data's decoding" in help_text and "[pretrain.cluster.checkpoint_every; default: 1]" in help_text


@pytest.mark.parametrize("section", ["finetune", "pretrain", "generate"])
def test_resumable_fields_are_what_resume_allows(section, tmp_path):
    from lbgen.config import resumable_fields
    from lbgen.runtime.outputs import check_resumable

    # The sets the stages kept by hand before the schema marked them (cluster settings nested now).
    cluster = {"cluster." + n for n in ("workers", "use_gpu", "accelerator_type", "cpus_per_worker", "checkpoint_every", "max_failures")}
    expected = {
        "finetune": {"output", "max_steps", "epochs", "sample_every"} | cluster,
        "pretrain": {"output", "epochs", "skip_bad_shards", "decode_batch_size", "decode_device", "read_block_rows", "shuffle_buffer"} | cluster,
        "generate": {"output", "batch_size", "score_beside", "workers", "min_workers", "cpus_per_worker", "use_gpu", "overwrite"},
    }[section]
    section_cls = type(getattr(Config(), section))
    assert resumable_fields(section_cls) == expected
    if section == "generate":
        return  # generate compares its manifest, not check_resumable
    base = resolve("tiny")
    (tmp_path / "config.yaml").write_text(to_yaml(base))
    (tmp_path / "checkpoints" / "checkpoint_000000").mkdir(parents=True)
    new_values = {"output": "elsewhere", "max_steps": 7, "epochs": 9, "sample_every": 3, "skip_bad_shards": True,
                  "decode_batch_size": 8, "decode_device": "cuda", "read_block_rows": 8, "shuffle_buffer": 8, "cluster.workers": 2,
                  "cluster.use_gpu": True, "cluster.accelerator_type": "A100", "cluster.cpus_per_worker": 0.25,
                  "cluster.checkpoint_every": 3, "cluster.max_failures": -1}

    def changed(path: str, value):
        *parents, leaf = path.split(".")
        node: dict = {}
        tip = node
        for p in parents:
            tip = tip.setdefault(p, {})
        tip[leaf] = value
        if path == "decode_device":  # decoding on the GPUs needs GPU workers
            node["cluster"] = {"use_gpu": True}
        return resolve("tiny", overrides={section: node})

    for path in expected:
        check_resumable(tmp_path, changed(path, new_values[path]), section, ("classes", "seed", section), resumable_fields(section_cls))
    for path, value in (("cluster.mixed_precision", "bf16"), ("batch_size", 2)):
        with pytest.raises(ConfigError, match=rf"\({section}\.{path}: "):
            check_resumable(tmp_path, changed(path, value), section, ("classes", "seed", section), resumable_fields(section_cls))


def _registries():
    from lbgen.data.images import IMAGE_FORMATS
    from lbgen.data.shapes import KINDS
    from lbgen.config.choices import FAULT_POINTS
    from lbgen.runtime.precision import MIXED_PRECISION, WEIGHT_DTYPES
    from lbgen.stages.protocols import PROTOCOLS

    return [
        ("generate.image_format", IMAGE_FORMATS), ("evaluate.protocol", PROTOCOLS), ("make_downstream.kind", KINDS),
        ("fault.point", FAULT_POINTS), ("finetune.cluster.mixed_precision", MIXED_PRECISION),
        ("pretrain.cluster.mixed_precision", MIXED_PRECISION), ("generate.dtype", WEIGHT_DTYPES),
    ]


@pytest.mark.parametrize("path, registry", _registries(), ids=lambda x: x if isinstance(x, str) else "")
def test_config_accepts_exactly_the_names_of_each_registry(path, registry):
    def setting(value):
        *parents, leaf = path.split(".")
        node: dict = {leaf: value}
        for p in reversed(parents):
            node = {p: node}
        if parents == ["fault"]:
            node["fault"]["marker"] = "/tmp/m"
        return node

    for name in registry:
        resolve("tiny", overrides=setting(name))
    with pytest.raises(ConfigError) as err:
        resolve("tiny", overrides=setting("bogus"))
    assert str(err.value).startswith(f"{path} must be") and all(name in str(err.value) for name in registry)


def test_registries_reach_their_implementations_without_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom lbgen.config import resolve\nresolve('tiny')\n"
            "print(sorted(m for m in ('torch', 'ray', 'pyarrow') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    from lbgen.data.shapes import KINDS
    from lbgen.stages.protocols import PROTOCOLS, load_protocol

    assert all(callable(load_protocol(name)) for name in PROTOCOLS) and all(callable(f) for f in KINDS.values())


def test_a_recipe_sets_its_fields_over_the_preset_and_under_the_users_own(tmp_path):
    from lbgen.config.presets import RECIPES

    deit = resolve("sd15-in1k", overrides={"pretrain": {"recipe": "deit"}}).pretrain
    assert {k: getattr(deit, k) for k in RECIPES["deit"]} == RECIPES["deit"]  # the preset's SGD lr 0.8 does not leak in
    assert resolve("sd15-in1k").pretrain.lr == 0.8 and resolve("sd15-in1k").pretrain.mixup == 0.0
    (tmp_path / "job.yaml").write_text("pretrain:\n  recipe: deit\n  weight_decay: 0.1\n")
    mine = resolve(config_file=tmp_path / "job.yaml", overrides={"pretrain": {"lr": 1e-3}}).pretrain
    assert (mine.opt, mine.weight_decay, mine.lr, mine.mixup) == ("adamw", 0.1, 1e-3, 0.8)  # the file's and the flag's win
    with pytest.raises(ConfigError, match=r"pretrain.recipe must be resnet or deit, got 'vit'"):
        resolve(overrides={"pretrain": {"recipe": "vit"}})
    with pytest.raises(ConfigError, match=r"pretrain.batch_size must be even with mixup/cutmix"):
        resolve(overrides={"pretrain": {"recipe": "deit", "batch_size": 33}})
