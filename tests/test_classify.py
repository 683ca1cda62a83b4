"""The `classify` protocol: a backbone's own classifier on real images keyed by class id (IN-val style)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lbgen.cli import main
from lbgen.data.transforms import Normalize
from lbgen.errors import BackboneError
from lbgen.models.backbones import backbone_classes, export_backbone, load_backbone

IDS = [f"n{i:08d}" for i in range(8)]
MEAN, STD = (0.5,) * 3, (0.25,) * 3


@pytest.fixture(scope="module")
def known_answer(tmp_path_factory):
    """An 8-class export and 24 images filed so that the answer is known from the model's own logits:
    images 0-11 under their top-1 class, 12-17 under their 3rd guess (a top-5 hit only), 18-23 under
    their last guess (no hit). Returns (export dir, set root, per-class top-1 expected)."""
    import timm

    root = tmp_path_factory.mktemp("classify")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=len(IDS)).eval()
    export = export_backbone(model, root / "backbone", timm_name="test_resnet", class_ids=IDS, class_names=IDS,
                             image_size=32, mean=MEAN, std=STD, crop_pct=1.0)
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        ranked = model(Normalize(MEAN, STD)(torch.from_numpy(pixels))).argsort(1, descending=True).numpy()
    rank_used = [0] * 12 + [2] * 6 + [7] * 6
    folders, rows = root / "imagenet" / "val", []
    for i, (image, rank) in enumerate(zip(pixels, rank_used)):
        class_id = IDS[ranked[i, rank]]
        (folders / class_id).mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        (folders / class_id / f"{i:03d}.png").write_bytes(buffer.getvalue())
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "class_id": class_id, "hit": rank == 0})
    per_class = {}
    for row in rows:
        per_class.setdefault(row["class_id"], []).append(row["hit"])
    parquet = root / "as-parquet"
    parquet.mkdir()
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("image", "class_id")} for r in rows]), parquet / "val-0.parquet")
    return export, root, {c: 100.0 * float(np.mean(h)) for c, h in per_class.items()}


@pytest.mark.ray
@pytest.mark.parametrize("layout", ["imagenet", "as-parquet"])
def test_classify_gives_the_known_top1_top5_and_per_class_accuracy(ray_local, known_answer, tmp_path, layout):
    export, root, per_class = known_answer
    out = tmp_path / "eval"
    assert main(["evaluate", "--preset", "tiny", "--protocol", "classify", "--backbone", str(export / "backbone.safetensors"),
                 "--downstream", str(root / layout), "--output", str(out)]) == 0
    (record,) = json.loads((out / "results.json").read_text())["classify"]
    assert (record["images"], record["top1"], record["top5"]) == (24, 50.0, 75.0)  # 12 and 12 + 6 of 24
    assert {c: v["top1"] for c, v in record["per_class"].items()} == pytest.approx(per_class, abs=0.01)
    summary = list(csv.DictReader((out / "classify.csv").open()))
    assert [(r["top1"], r["top5"]) for r in summary] == [("50.0", "75.0")]
    assert len(list(csv.DictReader((out / "classify_per_class.csv").open()))) == len(per_class)
    assert "| 24 |" in (out / "results.md").read_text() and "Same-class accuracy (classify protocol)" in (out / "results.md").read_text()


def test_classes_outside_the_backbones_table_are_refused_naming_them(known_answer, tmp_path, capsys):
    export, root, _ = known_answer
    val = tmp_path / "val"
    for class_id in ("n00000000", "n99999999"):
        (val / class_id).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(val / class_id / "a.png")
    code = main(["evaluate", "--preset", "tiny", "--protocol", "classify", "--backbone", str(export), "--downstream", str(tmp_path),
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "1 class(es) the backbone" in err[0] and "n99999999" in err[0] and "n00000000" not in err[0].split("trained on:")[1]
    assert not (tmp_path / "out").exists()


def test_the_classifier_is_kept_only_when_asked_for_and_timm_in1k_heads_use_the_imagenet_table(known_answer):
    export = known_answer[0]
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        assert load_backbone(str(export), classifier=True).model.eval()(x).shape == (1, 8)
        assert load_backbone(str(export)).model.eval()(x).shape[1] != 8  # pooled features
    assert backbone_classes(str(export)) == IDS
    in1k = backbone_classes("timm:resnet18.a1_in1k")  # read from timm's registry: no weights are fetched
    assert len(in1k) == 1000 and in1k[0] == "n01440764"
    with pytest.raises(BackboneError, match="random initialisation has no classifier"):
        backbone_classes("random:test_resnet")
