import argparse
import dataclasses

import pytest

from lbgen.config import (
    PRESETS,
    Config,
    ConfigError,
    add_config_flags,
    from_dict,
    overrides_from_args,
    resolve,
    to_yaml,
)


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
    leaves = {f"cfg:finetune.{f.name}" for f in dataclasses.fields(Config().finetune)}
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
