"""evaluate: subsets, the linear probe, backbone specs, and the stage end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shape_shards import write_shape_shards

from lbgen.cli import main
from lbgen.config import resolve
from lbgen.data.classes import load_class_table
from lbgen.data.transforms import decode_batch
from lbgen.models.backbones import BackboneError, export_backbone, load_backbone
from lbgen.stages.evaluate import fit_probe, stratified_subset
from lbgen.stages.pretrain import Pretrainer, image_transform, row_filter

TABLE = load_class_table("tiny10")


# ---------------------------------------------------------------- units


def test_stratified_subsets_are_per_class_seeded_and_nested():
    targets = np.repeat(np.arange(4), [50, 30, 10, 2])
    small, large = stratified_subset(targets, 0.1, seed=0), stratified_subset(targets, 0.5, seed=0)
    assert np.bincount(targets[small]).tolist() == [5, 3, 1, 1]  # at least one per class
    assert np.bincount(targets[large]).tolist() == [25, 15, 5, 1]
    assert set(small) <= set(large)
    assert np.array_equal(small, stratified_subset(targets, 0.1, seed=0))
    assert not np.array_equal(large, stratified_subset(targets, 0.5, seed=1))


def test_linear_probe_separates_separable_features_and_picks_l2_from_the_grid():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 16, generator=g)
    probe = fit_probe(x[:200], y[:200], 3, [1e-4, 1e-2, 1.0], max_iter=50, val_fraction=0.2, seed=0)
    assert probe.l2 in (1e-4, 1e-2, 1.0)
    assert (probe.predict(x[200:]) == y[200:].numpy()).mean() > 0.95
    # Labels with no relation to x: held-out accuracy near chance.
    shuffled = y[torch.randperm(300, generator=g)]
    noise = fit_probe(x[:200], shuffled[:200], 3, [1e-4, 1e-2, 1.0], max_iter=50, val_fraction=0.2, seed=0)
    assert (noise.predict(x[200:]) == shuffled[200:].numpy()).mean() < 0.55


class CountedImages:
    """An image set of 4 classes, each class a distinct colour plus noise, that records which images were read."""

    def __init__(self, n: int, seed: int):
        self.targets, self.classes, self.seed, self.read = np.arange(n) % 4, ["a", "b", "c", "d"], seed, set()

    def pixels(self, i: int) -> torch.Tensor:
        self.read.add(i)
        g = torch.Generator().manual_seed(self.seed * 100_000 + i)
        colour = torch.tensor([[60, 60, 60], [200, 60, 60], [60, 200, 60], [60, 60, 200]])[self.targets[i]]
        return (colour[:, None, None] + torch.randint(-30, 30, (3, 32, 32), generator=g)).to(torch.uint8)


def test_linear_protocol_embeds_only_the_images_its_subsets_train_on():
    from lbgen.stages.evaluate import LinearProtocol

    cfg = resolve("tiny", overrides={"evaluate": {"fractions": [0.1, 0.25]}})
    train, test = CountedImages(400, seed=1), CountedImages(40, seed=2)
    protocol = LinearProtocol("random:test_resnet", train, test, cfg, torch.device("cpu"))
    largest = stratified_subset(train.targets, 0.25, cfg.seed)
    assert train.read == set(largest.tolist()) and len(test.read) == 40  # 100 of the 400 train images
    for fraction in (0.1, 0.25):
        acc, _ = protocol.accuracy(stratified_subset(train.targets, fraction, cfg.seed))
        assert acc > 90  # the probe trained on the subset's own features and labels: colours are separable


# ---------------------------------------------------------------- end to end


def _train_backbone(output: Path, shard_dir: Path, epochs: int) -> Path:
    """A backbone trained on the shapes shards with the pretrain stage's own core, exported as pretrain does."""
    cfg = resolve("tiny", overrides={"pretrain": {"epochs": epochs, "val_fraction": 0.0}})
    table = pq.read_table(shard_dir / "data")
    spec, rows, batch = image_transform(cfg, True), row_filter(cfg), cfg.pretrain.batch_size
    steps = table.num_rows // batch
    torch.manual_seed(0)
    trainer = Pretrainer(cfg, len(TABLE), steps)
    for epoch in range(epochs):
        shuffled = table.take(np.random.default_rng(epoch).permutation(table.num_rows))
        batches = (
            {k: torch.from_numpy(v) for k, v in decode_batch(shuffled.slice(i * batch, batch), spec, rows, "train", seed=[epoch, i]).items()}
            for i in range(steps)
        )
        trainer.train_epoch(batches)
    pt = cfg.pretrain
    return export_backbone(trainer.model, output, timm_name=pt.model, class_ids=TABLE.ids, class_names=TABLE.names,
                           image_size=pt.image_size, mean=pt.mean, std=pt.std, crop_pct=pt.crop_pct)


@pytest.fixture(scope="module")
def downstream(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("downstream")
    assert main(["make-downstream", "--preset", "tiny", "--output", str(root / "shapes"), "--train-per-class", "30", "--test-per-class", "20", "--size", "32"]) == 0
    assert main(["make-downstream", "--preset", "tiny", "--kind", "shapes-in9", "--output", str(root / "in9"), "--train-per-class", "20", "--test-per-class", "10", "--size", "32"]) == 0
    return root


@pytest.mark.ray
@pytest.mark.slow
def test_trained_backbone_beats_random_init_under_the_linear_probe(ray_local, downstream, tmp_path, one_torch_thread):
    shards = write_shape_shards(tmp_path / "shards", TABLE, per_class=40, size=40)
    backbone = _train_backbone(tmp_path / "backbone", shards, epochs=20)
    out = tmp_path / "eval"
    code = main([
        "evaluate", "--preset", "tiny", "--backbone", str(backbone), "random:test_resnet", "--downstream", str(downstream / "shapes"),
        "--bias", str(downstream / "in9"), "--fractions", "0.2,1.0", "--output", str(out),
    ])
    assert code == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["backbone"], r["fraction"]) for r in rows] == [(str(backbone), "0.2"), (str(backbone), "1.0"), ("random:test_resnet", "0.2"), ("random:test_resnet", "1.0")]
    acc = {(r["backbone"], r["fraction"]): float(r["accuracy"]) for r in rows}
    assert acc[(str(backbone), "1.0")] > acc[("random:test_resnet", "1.0")] + 15, acc
    assert acc[(str(backbone), "0.2")] > acc[("random:test_resnet", "0.2")], acc
    report = (out / "results.md").read_text()
    assert report.count("| shapes |") == 4 and "## Average over datasets" in report and "BG_Gap" in report
    assert (out / "accuracy_vs_fraction.png").stat().st_size > 1000
    bias = list(csv.DictReader((out / "bias.csv").open()))
    assert len(bias) == 2
    for r in bias:
        assert float(r["bg_gap"]) == pytest.approx(float(r["mixed_same"]) - float(r["mixed_rand"]), abs=0.02)


@pytest.mark.slow
@pytest.mark.ray
def test_finetune_protocol_learns_the_shapes(ray_local, downstream, tmp_path):
    out = tmp_path / "eval"
    code = main([
        "evaluate", "--preset", "tiny", "--backbone", "random:test_resnet", "--downstream", str(downstream / "shapes"), "--protocol", "finetune",
        "--fractions", "1.0", "--ft-epochs", "15", "--ft-lr", "0.003", "--output", str(out),
    ])
    assert code == 0
    (row,) = list(csv.DictReader((out / "results.csv").open()))
    assert row["protocol"] == "finetune" and row["train_images"] == "300"
    # 10 shape classes on shifted test backgrounds: chance is 10 %; 15 epochs from random init reach ~25 %.
    assert float(row["accuracy"]) >= 18, row


def test_missing_backbone_is_a_one_line_error(downstream, tmp_path, capsys):
    code = main(["evaluate", "--preset", "tiny", "--backbone", str(tmp_path / "nope"), "--downstream", str(downstream / "shapes"), "--output", str(tmp_path / "o")])
    assert code == 2 and "no model.json" in capsys.readouterr().err


def test_evaluation_uses_the_backbone_own_size_unless_one_is_set():
    import dataclasses


    backbone = dataclasses.replace(load_backbone("random:test_resnet", seed=0), image_size=48)  # trained at 48 px
    assert resolve().evaluate.eval_image_size is None
    assert backbone.eval_transform(resolve().evaluate.eval_image_size).size == 48
    assert backbone.eval_transform(32).size == 32


def test_random_backbone_is_seeded():
    a, b = load_backbone("random:test_resnet", seed=3), load_backbone("random:test_resnet", seed=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.model.eval()(x), b.model.eval()(x))


def test_backbone_named_by_its_directory_model_json_or_weights_file(tmp_path):
    import timm

    export = export_backbone(timm.create_model("test_resnet", num_classes=2), tmp_path / "pretrain", timm_name="test_resnet",
                             class_ids=["a", "b"], class_names=["a", "b"], image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                             crop_pct=1.0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = []
    for spec in (export, export / "model.json", export / "backbone.safetensors"):  # what `pretrain` prints: the weights file
        backbone = load_backbone(str(spec))
        assert backbone.image_size == 32
        with torch.no_grad():
            outputs.append(backbone.model.eval()(x))
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])
    (tmp_path / "notes.txt").write_text("not a backbone")
    with pytest.raises(BackboneError, match="a backbone is a `lbgen pretrain` output: its directory, its model.json or its"):
        load_backbone(str(tmp_path / "notes.txt"))


# ---------------------------------------------------------------- a real dataset


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("protocol, flags, floor", [
    ("linear", [], 60),
    ("finetune", ["--ft-epochs", "3", "--ft-lr", "0.003"], 50),
])
def test_evaluation_learns_real_fashion_mnist(ray_local, fashion_mnist_root, tmp_path, protocol, flags, floor):
    """The real Fashion-MNIST through `torchvision:FashionMNIST`: 2 % of its train split (1,200 images),
    its whole test split (10,000), a random-init backbone; chance is 10 %."""
    out = tmp_path / "eval"
    assert main(["evaluate", "--preset", "tiny", "--backbone", "random:test_resnet", "--downstream", "torchvision:FashionMNIST",
                 "--data-root", str(fashion_mnist_root), "--protocol", protocol, "--fractions", "0.02", "--eval-image-size", "32",
                 "--output", str(out), *flags]) == 0
    (row,) = list(csv.DictReader((out / "results.csv").open()))
    assert (row["dataset"], row["protocol"], row["train_images"]) == ("FashionMNIST", protocol, "1200")
    assert float(row["accuracy"]) >= floor, row
    print(f"Fashion-MNIST, {protocol}: {row['accuracy']} %")


def _shapes_backbone(shapes: Path, root: Path) -> Path:
    """A random test_resnet exported with the shapes set's folder names as its class ids, so that `classify`
    can key the set's images to its outputs."""
    import timm

    classes = sorted(p.name for p in (shapes / "test").iterdir())
    model = timm.create_model("test_resnet", num_classes=len(classes))
    return export_backbone(model, root / "backbone", timm_name="test_resnet", class_ids=classes, class_names=classes,
                           image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)


@pytest.mark.ray
@pytest.mark.parametrize("protocol", ["linear", "finetune", "classify"])
def test_evaluate_with_its_defaults_on_two_cpus_refuses_at_once_naming_the_settings(ray_local, downstream, tmp_path, capsys, protocol):
    """No preset: each evaluation task asks for `evaluate.task_cpus` (4) CPUs, which a 2-CPU machine cannot
    give. Ray would queue such a task forever; lbgen refuses the plan in one line, before writing anything."""
    import time

    assert ray_local.cluster_resources()["CPU"] == 2 and resolve().evaluate.task_cpus > 2  # the defaults do not fit
    shapes = downstream / "shapes"
    backbone = str(_shapes_backbone(shapes, tmp_path)) if protocol == "classify" else "random:test_resnet"
    started = time.monotonic()
    code = main(["evaluate", "--protocol", protocol, "--backbone", backbone, "--downstream", str(shapes),
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and time.monotonic() - started < 60, err
    assert len(err) == 1 and "evaluate.task_cpus (--task-cpus)" in err[0] and "cannot hold 1 of 1 evaluation task" in err[0], err
    assert not (tmp_path / "out").exists()
