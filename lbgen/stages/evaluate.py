"""Stage 4, `evaluate`: transfer of backbones to downstream classification sets, plus bias metrics.

For each (backbone, downstream set) pair, a Ray task (one GPU when the cluster has
any) runs the protocol over the fraction sweep on the same stratified, seeded, nested
subsets for every backbone:
- `linear`: frozen pooled features, standardised, and a multinomial logistic
  regression (L-BFGS, L2 chosen on a stratified validation split of the subset),
  refit on the whole subset, scored on the eval split;
- `finetune`: the whole backbone and a new head trained with one fixed recipe
  (AdamW, warm-up + cosine, label smoothing 0.1, random resized crop + flip).
ImageNet-9-style sets (`bias`) get a linear classifier fitted on original/train and
the background gap (`lbgen.method.bias`). Outputs: `results.json` (every record, what the report
reads), `results.csv`, `results.md`, `accuracy_vs_fraction.png` (and `bias.csv` when bias sets are given;
see `lbgen.data.results`). The `classify` protocol (`lbgen.stages.classify`) applies each backbone's own
classifier to real images of its classes instead, and writes `classify.csv` and `classify_per_class.csv`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lbgen.config import Config, from_dict, require_local, to_yaml
from lbgen.data.downstream import ImageFolderImages, TransformedImages, dataset_name, open_downstream
from lbgen.data.results import (
    BIAS_FIELDS,
    CLASSIFY_FIELDS,
    PER_CLASS_FIELDS,
    RESULT_FIELDS,
    RESULTS_JSON,
    per_class_rows,
    plot_results,
    results_markdown,
    write_csv,
    write_results,
)
from lbgen.data.transforms import ImageTransform, Normalize
from lbgen.method.bias import accuracy, background_gap, in9_folders
from lbgen.models.backbones import Backbone, load_backbone
from lbgen.runtime import resources
from lbgen.runtime.seeds import derive_seed
from lbgen.stages.protocols import load_protocol

log = logging.getLogger(__name__)

FINETUNE_CROP_SCALE = (0.25, 1.0)  # the fixed fine-tuning recipe's crop range


# ---------------------------------------------------------------- subsets


def stratified_subset(targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified subset: `fraction` of each class (at least one), nested across fractions.

    Each class is permuted once by a seed of (seed, class), and a subset takes the first
    `max(1, round(fraction * n_class))` of it: a smaller fraction is part of a larger one.
    """
    chosen = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        order = np.random.default_rng(derive_seed(seed, "subset", int(label))).permutation(members)
        chosen.append(order[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(chosen))


def validation_split(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions into `targets`, stratified; a class with one member stays in train."""
    train, val = [], []
    for label in np.unique(targets):
        members = np.random.default_rng(derive_seed(seed, "probe-val", int(label))).permutation(np.flatnonzero(targets == label))
        n_val = min(len(members) - 1, round(val_fraction * len(members)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ---------------------------------------------------------------- linear probe


@torch.no_grad()
def extract_features(backbone: Backbone, dataset: TransformedImages, batch_size: int, workers: int, device) -> torch.Tensor:
    """(N, D) float32 pooled features of `dataset` (frozen backbone, eval mode), on `device`: the probe is then
    fitted where they are (on a GPU, not on the CPU of a task that holds one)."""
    model = backbone.model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    normalize = Normalize(backbone.mean, backbone.std, device)
    chunks = [model(normalize(images)).float() for images, _ in loader]
    return torch.cat(chunks)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int) -> nn.Linear:
    """Multinomial logistic regression: mean cross-entropy + l2 * ||W||^2, full-batch L-BFGS."""
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


class Probe:
    """A fitted linear probe: standardisation statistics and the logistic-regression head."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, head: nn.Linear, l2: float):
        self.mean, self.std, self.head, self.l2 = mean, std, head, l2

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        return self.head((x - self.mean) / self.std).argmax(1).cpu().numpy()


def fit_probe(train_x, train_y, num_classes: int, l2_grid, max_iter: int, val_fraction: float, seed: int) -> Probe:
    """Standardise, choose the L2 on a stratified validation split of the training features, refit on all.

    When the subset is too small to hold out one image of any class, the grid's middle value is used.
    """
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False) + 1e-6
    x, labels = (train_x - mean) / std, train_y.numpy()
    train_y = train_y.to(train_x.device)
    fit_idx, val_idx = validation_split(labels, val_fraction, seed)
    l2_grid = sorted(l2_grid)
    best = l2_grid[len(l2_grid) // 2]
    if len(val_idx):
        scores = []
        for l2 in l2_grid:
            head = fit_logistic(x[fit_idx], train_y[fit_idx], num_classes, l2, max_iter)
            scores.append(accuracy(Probe(0.0, 1.0, head, l2).predict(x[val_idx]), labels[val_idx]))
        best = l2_grid[int(np.argmax(scores))]  # ties go to the weakest penalty
    return Probe(mean, std, fit_logistic(x, train_y, num_classes, best, max_iter), best)


# ---------------------------------------------------------------- fine-tune protocol


def finetune_accuracy(spec: str, train_set, indices: np.ndarray, test_set, num_classes: int, cfg: Config, device) -> float:
    """Fine-tune the whole backbone `spec` + a new head on `indices` of `train_set`; test accuracy (percent)."""
    from timm.scheduler import CosineLRScheduler

    ev = cfg.evaluate
    backbone = load_backbone(spec, cfg.seed)
    model = backbone.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "finetune-head"))
        model.reset_classifier(num_classes)
    model.to(device)
    size = ev.eval_image_size or backbone.image_size
    train_data = TransformedImages(train_set, ImageTransform(size, train=True, crop_scale=FINETUNE_CROP_SCALE), indices, cfg.seed)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "finetune-order"))
    batch_size = min(ev.ft_batch_size, len(indices))
    loader = torch.utils.data.DataLoader(train_data, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=ev.loader_workers, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ev.ft_lr, weight_decay=ev.ft_weight_decay)
    steps = ev.ft_epochs * len(loader)
    warmup = len(loader) if ev.ft_epochs > 1 else 0
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, steps - warmup), warmup_t=warmup, warmup_prefix=True, t_in_epochs=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    normalize = Normalize(backbone.mean, backbone.std, device)
    step = 0
    for epoch in range(ev.ft_epochs):
        train_data.epoch = epoch
        model.train()
        for images, labels in loader:
            loss = loss_fn(model(normalize(images)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
    model.eval()
    test_data = TransformedImages(test_set, backbone.eval_transform(ev.eval_image_size))
    predictions, targets = [], []
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(test_data, batch_size=ev.eval_batch_size, num_workers=ev.loader_workers):
            predictions.append(model(normalize(images)).argmax(1).cpu())
            targets.append(labels)
    return accuracy(torch.cat(predictions).numpy(), torch.cat(targets).numpy())


# ---------------------------------------------------------------- one task


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SweepProtocol:
    """A protocol trained on each stratified subset of a set's train split and scored on its eval split:
    one result row per fraction. Subclasses give `accuracy(indices)`."""

    section = "results"  # where results.json keeps its records

    @classmethod
    def run(cls, cfg: Config, spec: str, dataset: str, device) -> list[dict]:
        ev = cfg.evaluate
        train_set, test_set = open_downstream(dataset, ev.data_root)
        protocol = cls(spec, train_set, test_set, cfg, device)
        rows = []
        for fraction in ev.fractions:
            started = time.perf_counter()
            indices = stratified_subset(train_set.targets, fraction, cfg.seed)
            acc, l2 = protocol.accuracy(indices)
            rows.append({
                "backbone": spec, "dataset": dataset_name(dataset), "protocol": ev.protocol, "fraction": fraction,
                "train_images": len(indices), "accuracy": round(acc, 2), "l2": l2, "seconds": round(time.perf_counter() - started, 2),
            })
        return rows


class LinearProtocol(SweepProtocol):
    """Features of the frozen backbone, extracted once for the images some subset holds (the subsets are
    nested: the largest fraction's; 1 % of a train split embeds 1 % of it); one linear probe per subset."""

    def __init__(self, spec: str, train_set, test_set, cfg: Config, device):
        ev = cfg.evaluate
        self.cfg, self.num_classes = cfg, len(train_set.classes)
        backbone = load_backbone(spec, cfg.seed)
        transform = backbone.eval_transform(ev.eval_image_size)
        self.embedded = np.unique(np.concatenate([stratified_subset(train_set.targets, f, cfg.seed) for f in ev.fractions]))
        self.train_x = extract_features(backbone, TransformedImages(train_set, transform, self.embedded), ev.eval_batch_size, ev.loader_workers, device)
        self.test_x = extract_features(backbone, TransformedImages(test_set, transform), ev.eval_batch_size, ev.loader_workers, device)
        self.train_y, self.test_y = torch.from_numpy(train_set.targets[self.embedded]), torch.from_numpy(test_set.targets)

    def accuracy(self, indices: np.ndarray) -> tuple[float, float | None]:
        """Test accuracy (percent) of a probe fitted on `indices` (of the train split), and its chosen L2."""
        ev, idx = self.cfg.evaluate, torch.from_numpy(np.searchsorted(self.embedded, indices))
        probe = fit_probe(self.train_x[idx], self.train_y[idx], self.num_classes, ev.probe_l2, ev.probe_max_iter, ev.probe_val_fraction, self.cfg.seed)
        return accuracy(probe.predict(self.test_x), self.test_y.numpy()), probe.l2


class FinetuneProtocol(SweepProtocol):
    """The whole backbone and a new head fine-tuned afresh on each training subset."""

    def __init__(self, spec: str, train_set, test_set, cfg: Config, device):
        self.spec, self.train_set, self.test_set, self.cfg, self.device = spec, train_set, test_set, cfg, device

    def accuracy(self, indices: np.ndarray) -> tuple[float, float | None]:
        """Test accuracy (percent) after fine-tuning on `indices`; no L2."""
        num_classes = len(self.train_set.classes)
        return finetune_accuracy(self.spec, self.train_set, indices, self.test_set, num_classes, self.cfg, self.device), None


def evaluate_pair(config: dict, spec: str, dataset: str) -> list[dict]:
    """The records of one backbone on one set under the configured protocol."""
    cfg = from_dict(Config, config)
    return load_protocol(cfg.evaluate.protocol).run(cfg, spec, dataset, _device())


def classify_pair(config: dict, spec: str, dataset: str) -> list[dict]:
    """The `classify` records of one exported backbone on one set, beside the configured protocol (`also_classify`)."""
    cfg = from_dict(Config, config)
    return load_protocol("classify").run(cfg, spec, dataset, _device())


def own_classifiers(specs: list[str]) -> list[str]:
    """The backbones with a classifier over a class table: pretrain exports (`random:`/`timm:` have none of ours)."""
    return [spec for spec in specs if ":" not in spec]


def bias_pair(config: dict, spec: str, root: str) -> dict:
    """Background gap of one backbone on one ImageNet-9-style set (linear classifier on original/train)."""
    cfg = from_dict(Config, config)
    ev = cfg.evaluate
    device = _device()
    folders = in9_folders(root)
    backbone = load_backbone(spec, cfg.seed)
    transform = backbone.eval_transform(ev.eval_image_size)

    def features(folder: Path):
        images = ImageFolderImages(folder)
        return extract_features(backbone, TransformedImages(images, transform), ev.eval_batch_size, ev.loader_workers, device), torch.from_numpy(images.targets)

    train_x, train_y = features(folders["train"])
    probe = fit_probe(train_x, train_y, int(train_y.max()) + 1, ev.probe_l2, ev.probe_max_iter, ev.probe_val_fraction, cfg.seed)
    results = {}
    for variant in ("original", "mixed_same", "mixed_rand"):
        x, y = features(folders[variant])
        results[variant] = (probe.predict(x), y.numpy())
    gap = background_gap(results)
    return {"backbone": spec, "dataset": Path(root).name, **{k: round(v, 2) for k, v in gap.items()}}


# ---------------------------------------------------------------- driver


def check_inputs(cfg: Config) -> None:
    """Fail before any task starts when the class table, a backbone or a dataset is bad or missing, or the
    output is unusable."""
    from lbgen.config import ConfigError
    from lbgen.data.classes import load_class_table
    from lbgen.models.backbones import BackboneError, read_meta
    from lbgen.runtime.outputs import check_output_dir

    load_class_table(cfg.classes)  # every command refuses a bad --classes, as it always has
    require_local(cfg, "evaluate")
    ev = cfg.evaluate
    check_output_dir(ev.output, "evaluate.output")
    if not ev.backbone:
        raise ConfigError("evaluate needs at least one --backbone")
    if not ev.downstream and not ev.bias:
        raise ConfigError("evaluate needs --downstream DIR... (or --bias DIR...)")
    for spec in ev.backbone:
        if ":" not in spec:
            read_meta(Path(spec))
        elif spec.split(":", 1)[0] not in ("random", "timm"):
            raise BackboneError(f"backbone {spec!r}: unknown prefix; use a pretrain output dir, random:<name> or timm:<name>")
    check_sets(cfg)
    for root in ev.bias:
        in9_folders(root)


def check_sets(cfg: Config) -> None:
    """Open every downstream set the way its protocol will; `classify` also maps each set's classes to each
    backbone's and refuses those it lacks."""
    from lbgen.stages.classify import check_set

    ev = cfg.evaluate
    for dataset in ev.downstream:
        if ev.protocol == "classify":
            check_set(dataset, ev.backbone)
        else:
            open_downstream(dataset, ev.data_root)
            if ev.also_classify:
                check_set(dataset, own_classifiers(ev.backbone))


def task_resources(cfg: Config) -> dict[str, float] | None:
    """What each evaluation task holds on the attached Ray cluster, once the cluster is known to hold one
    (refused in one line naming the settings, never queued forever); None without Ray: tasks run here."""
    import ray

    if not ray.is_initialized():
        return None
    ev = cfg.evaluate
    gpus = ev.task_gpus if ev.task_gpus is not None else float(ray.cluster_resources().get("GPU", 0) > 0)
    holds = {"CPU": ev.task_cpus, "GPU": gpus}
    resources.require("evaluate", [resources.Request("evaluation task", 1, holds)],
                      "evaluate.task_cpus (--task-cpus) or evaluate.task_gpus (--task-gpus)", cfg.resource_wait_s)
    return holds


def _run_all(fn, jobs: list[tuple], cfg: Config, holds: dict[str, float] | None) -> list:
    """`fn(config, *job)` for every job: as Ray tasks each holding `holds` when Ray is up, else in this process."""
    config = dataclasses.asdict(cfg)
    if holds is None or not jobs:
        return [fn(config, *job) for job in jobs]
    import ray

    print(f"[evaluate] {len(jobs)} {fn.__name__} task(s), each holding {resources.format_resources(holds)}", flush=True)
    remote = ray.remote(num_cpus=holds["CPU"], num_gpus=holds["GPU"])(fn)
    return ray.get([remote.remote(config, *job) for job in jobs])


def evaluate(cfg: Config, checked: None = None) -> Path:
    """Evaluate every backbone on every downstream (and bias) set; returns the output directory.

    `checked`: the CLI's pre-flight ran `check_inputs`, which returns nothing; evaluation checks again
    (it reads only metadata)."""
    check_inputs(cfg)
    holds = task_resources(cfg)  # before anything is written
    ev = cfg.evaluate
    output = Path(ev.output).expanduser().resolve()
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(ev, output=str(output)))
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(to_yaml(cfg))

    pairs = [(spec, dataset) for spec in ev.backbone for dataset in ev.downstream]
    records = [row for result in _run_all(evaluate_pair, pairs, cfg, holds) for row in result]
    sections = {"results": [], "classify": [], load_protocol(ev.protocol).section: records}
    if ev.also_classify and ev.protocol != "classify":
        own = [(spec, dataset) for spec in own_classifiers(ev.backbone) for dataset in ev.downstream]
        sections["classify"] = [row for result in _run_all(classify_pair, own, cfg, holds) for row in result]
    rows, classify = sections["results"], sections["classify"]
    bias_rows = _run_all(bias_pair, [(spec, root) for spec in ev.backbone for root in ev.bias], cfg, holds)

    write_results(rows, bias_rows, ev.protocol, output / RESULTS_JSON, classify)  # before results.csv, the completion marker
    if rows:
        write_csv(rows, output / "results.csv", RESULT_FIELDS)
        plot_results(rows, output / "accuracy_vs_fraction.png")
    if classify:
        write_csv(classify, output / "classify.csv", CLASSIFY_FIELDS)
        write_csv(per_class_rows(classify), output / "classify_per_class.csv", PER_CLASS_FIELDS)
    if bias_rows:
        write_csv(bias_rows, output / "bias.csv", BIAS_FIELDS)
    (output / "results.md").write_text(results_markdown(rows, bias_rows, ev.protocol, classify=classify))
    return output


def done_line(cfg: Config, output: Path) -> str:
    """What the CLI prints when evaluation is done."""
    return f"results: {output / 'results.md'}"


def is_complete(directory: Path) -> bool:
    """Whether `directory` holds finished results (`results.csv` is written last)."""
    return (Path(directory) / "results.csv").exists()
