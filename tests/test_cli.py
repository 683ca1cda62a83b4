"""lbgen.cli: help from the config's own comments, without torch; no preset means the paper's settings."""

import dataclasses
import subprocess
import sys
import typing

import pytest

from lbgen.cli import first_line, main
from lbgen.config import Config, field_comments, resolve


def test_help_imports_neither_torch_nor_ray():
    code = ("import sys\nfrom lbgen.cli import build_parser\n"
            "for argv in (['--help'], ['finetune', '--help'], ['generate', '--help']):\n"
            "    try:\n        build_parser().parse_args(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'torchvision', 'pyarrow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _sections(cls) -> list:
    """`cls` and every dataclass nested in it (a section, a section's `cluster`)."""
    nested = [tp for tp in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(tp)]
    return [cls] + [s for tp in nested for s in _sections(tp) if s is not cls]


SECTIONS = list(dict.fromkeys(_sections(Config)))


@pytest.mark.parametrize("section", SECTIONS, ids=lambda c: c.__name__)
def test_every_setting_has_an_explanation(section):
    comments, hints = field_comments(section), typing.get_type_hints(section)
    missing = [f.name for f in dataclasses.fields(section) if not dataclasses.is_dataclass(hints[f.name]) and not comments.get(f.name)]
    assert not missing


def test_help_shows_explanation_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "CLIP text for the discriminator's \"real\" side" in text and "[finetune.real_template; default: {name}]" in text
    # fields listed under one comment share it
    assert text.count("LoRA on the UNet attention projections.") == 3


def test_no_preset_means_the_paper_settings(tmp_path, capsys):
    assert resolve() == Config()
    assert resolve().model.generator == "sd-legacy/stable-diffusion-v1-5" and resolve().model.resolution == 512
    assert resolve().evaluate.eval_image_size is None  # evaluation at each backbone's own size
    # The first line names the preset and the models, before any check or model load.
    assert main(["finetune", "--classes", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o")]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("lbgen finetune: preset none (the paper settings), model.generator sd-legacy/stable-diffusion-v1-5, "
                      "model.clip ViT-L-14, model.iqa topiq_nr")
    assert first_line("pretrain", "tiny", resolve("tiny")) == "lbgen pretrain: preset tiny, pretrain.model test_resnet"
