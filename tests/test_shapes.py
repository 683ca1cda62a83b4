"""lbgen.data.shapes through `lbgen make-downstream`: a seeded ImageFolder that the downstream reader opens."""

from lbgen.cli import main
from lbgen.data.downstream import open_downstream
from lbgen.data.shapes import SHAPE_CLASSES


def test_make_downstream_writes_a_seeded_image_folder(tmp_path):
    args = ["make-downstream", "--preset", "tiny", "--train-per-class", "3", "--test-per-class", "2", "--size", "32"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--output", str(tmp_path / "b")]) == 0
    train, test = open_downstream(tmp_path / "a")
    assert len(train.classes) == len(SHAPE_CLASSES) and len(train.targets) == 30 and len(test.targets) == 20
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "a" / files[1]).read_bytes()
