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
reads), `results.csv`, `results.md`, `accuracy_vs_fraction.png` (and `bias.csv` when bias sets are given).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lbgen.config import Config, from_dict, require_local, to_yaml
from lbgen.data.downstream import ImageFolderImages, TransformedImages, open_downstream
from lbgen.data.torchvision_sets import is_torchvision
from lbgen.data.transforms import ImageTransform, normalize
from lbgen.method.bias import accuracy, background_gap, in9_folders
from lbgen.models.backbones import Backbone, load_backbone
from lbgen.runtime.seeds import derive_seed
from lbgen.stages.protocols import load_protocol

log = logging.getLogger(__name__)

RESULT_FIELDS = ("backbone", "dataset", "protocol", "fraction", "train_images", "accuracy", "l2", "seconds")
BIAS_FIELDS = ("backbone", "dataset", "original", "mixed_same", "mixed_rand", "bg_gap")
RESULTS_JSON = "results.json"
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


def eval_transform(backbone: Backbone, size: int | None) -> ImageTransform:
    return ImageTransform(size or backbone.image_size, train=False, crop_pct=backbone.crop_pct)


@torch.no_grad()
def extract_features(backbone: Backbone, dataset: TransformedImages, batch_size: int, workers: int, device) -> torch.Tensor:
    """(N, D) float32 pooled features of `dataset` (frozen backbone, eval mode), on the CPU."""
    model = backbone.model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    chunks = [model(normalize(images.to(device), backbone.mean, backbone.std)).float().cpu() for images, _ in loader]
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
        return self.head((x - self.mean) / self.std).argmax(1).numpy()


def fit_probe(train_x, train_y, num_classes: int, l2_grid, max_iter: int, val_fraction: float, seed: int) -> Probe:
    """Standardise, choose the L2 on a stratified validation split of the training features, refit on all.

    When the subset is too small to hold out one image of any class, the grid's middle value is used.
    """
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False) + 1e-6
    x = (train_x - mean) / std
    fit_idx, val_idx = validation_split(train_y.numpy(), val_fraction, seed)
    l2_grid = sorted(l2_grid)
    best = l2_grid[len(l2_grid) // 2]
    if len(val_idx):
        scores = []
        for l2 in l2_grid:
            head = fit_logistic(x[fit_idx], train_y[fit_idx], num_classes, l2, max_iter)
            scores.append(accuracy(Probe(0.0, 1.0, head, l2).predict(x[val_idx]), train_y[val_idx].numpy()))
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
    step = 0
    for epoch in range(ev.ft_epochs):
        train_data.epoch = epoch
        model.train()
        for images, labels in loader:
            loss = loss_fn(model(normalize(images.to(device), backbone.mean, backbone.std)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
    model.eval()
    test_data = TransformedImages(test_set, eval_transform(backbone, ev.eval_image_size))
    predictions, targets = [], []
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(test_data, batch_size=ev.eval_batch_size, num_workers=ev.loader_workers):
            predictions.append(model(normalize(images.to(device), backbone.mean, backbone.std)).argmax(1).cpu())
            targets.append(labels)
    return accuracy(torch.cat(predictions).numpy(), torch.cat(targets).numpy())


# ---------------------------------------------------------------- one task


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LinearProtocol:
    """Features of the frozen backbone, extracted once; one linear probe per training subset."""

    def __init__(self, spec: str, train_set, test_set, cfg: Config, device):
        ev = cfg.evaluate
        self.cfg, self.num_classes = cfg, len(train_set.classes)
        backbone = load_backbone(spec, cfg.seed)
        transform = eval_transform(backbone, ev.eval_image_size)
        self.train_x = extract_features(backbone, TransformedImages(train_set, transform), ev.eval_batch_size, ev.loader_workers, device)
        self.test_x = extract_features(backbone, TransformedImages(test_set, transform), ev.eval_batch_size, ev.loader_workers, device)
        self.train_y, self.test_y = torch.from_numpy(train_set.targets), torch.from_numpy(test_set.targets)

    def accuracy(self, indices: np.ndarray) -> tuple[float, float | None]:
        """Test accuracy (percent) of a probe fitted on `indices`, and its chosen L2."""
        ev, idx = self.cfg.evaluate, torch.from_numpy(indices)
        probe = fit_probe(self.train_x[idx], self.train_y[idx], self.num_classes, ev.probe_l2, ev.probe_max_iter, ev.probe_val_fraction, self.cfg.seed)
        return accuracy(probe.predict(self.test_x), self.test_y.numpy()), probe.l2


class FinetuneProtocol:
    """The whole backbone and a new head fine-tuned afresh on each training subset."""

    def __init__(self, spec: str, train_set, test_set, cfg: Config, device):
        self.spec, self.train_set, self.test_set, self.cfg, self.device = spec, train_set, test_set, cfg, device

    def accuracy(self, indices: np.ndarray) -> tuple[float, float | None]:
        """Test accuracy (percent) after fine-tuning on `indices`; no L2."""
        num_classes = len(self.train_set.classes)
        return finetune_accuracy(self.spec, self.train_set, indices, self.test_set, num_classes, self.cfg, self.device), None


def dataset_name(dataset: str) -> str:
    """How results name a set: torchvision's name, or the directory's."""
    return dataset.split(":", 1)[1] if is_torchvision(dataset) else Path(dataset).name


def evaluate_pair(config: dict, spec: str, dataset: str) -> list[dict]:
    """All fractions of one backbone on one downstream set: a list of result rows."""
    cfg = from_dict(Config, config)
    ev = cfg.evaluate
    train_set, test_set = open_downstream(dataset, ev.data_root)
    name = dataset_name(dataset)
    protocol = load_protocol(ev.protocol)(spec, train_set, test_set, cfg, _device())
    rows = []
    for fraction in ev.fractions:
        started = time.perf_counter()
        indices = stratified_subset(train_set.targets, fraction, cfg.seed)
        acc, l2 = protocol.accuracy(indices)
        rows.append({
            "backbone": spec, "dataset": name, "protocol": ev.protocol, "fraction": fraction, "train_images": len(indices),
            "accuracy": round(acc, 2), "l2": l2, "seconds": round(time.perf_counter() - started, 2),
        })
    return rows


def bias_pair(config: dict, spec: str, root: str) -> dict:
    """Background gap of one backbone on one ImageNet-9-style set (linear classifier on original/train)."""
    cfg = from_dict(Config, config)
    ev = cfg.evaluate
    device = _device()
    folders = in9_folders(root)
    backbone = load_backbone(spec, cfg.seed)
    transform = eval_transform(backbone, ev.eval_image_size)

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


# ---------------------------------------------------------------- outputs


def _fmt_fraction(f: float) -> str:
    return f"{f * 100:g}%"


def write_csv(rows: list[dict], path: Path, fields) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def averages(rows: list[dict]) -> dict[str, dict[float, float]]:
    """backbone -> fraction -> mean accuracy over datasets."""
    table: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        table.setdefault(row["backbone"], {}).setdefault(row["fraction"], []).append(row["accuracy"])
    return {b: {f: float(np.mean(v)) for f, v in per.items()} for b, per in table.items()}


def write_results(rows: list[dict], bias_rows: list[dict], protocol: str, path: Path) -> None:
    """`results.json`: the protocol, one record per backbone x dataset x fraction (`RESULT_FIELDS`), one per
    backbone x bias set (`BIAS_FIELDS`)."""
    data = {"protocol": protocol, "results": [{k: r[k] for k in RESULT_FIELDS} for r in rows],
            "bias": [{k: r[k] for k in BIAS_FIELDS} for r in bias_rows]}
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_results(path: Path) -> dict:
    """What `write_results` wrote; a ValueError naming `path` when it is not that."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot be read ({err})") from None
    ok = (isinstance(data, dict) and isinstance(data.get("protocol"), str)
          and all(isinstance(data.get(key), list) and all(isinstance(r, dict) and set(fields) <= r.keys() for r in data[key])
                  for key, fields in (("results", RESULT_FIELDS), ("bias", BIAS_FIELDS))))
    if not ok:
        raise ValueError(f"{path}: not an lbgen results file (protocol, results {RESULT_FIELDS}, bias {BIAS_FIELDS})")
    return data


def results_markdown(rows: list[dict], bias_rows: list[dict], protocol: str, level: int = 1) -> str:
    """The report: one row per backbone x dataset x fraction, the average over datasets, the bias table.

    `level`: the title's heading level (the run report nests these under its own headings).
    """
    fractions = sorted({r["fraction"] for r in rows})
    h1, h2 = "#" * level, "#" * (level + 1)
    lines = [f"{h1} Transfer results ({protocol} protocol)", "", "Top-1 accuracy (%) on each set's eval split.", "",
             "| backbone | dataset | fraction | train images | accuracy | L2 |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        l2 = "" if r["l2"] is None else f"{r['l2']:g}"
        lines.append(f"| {r['backbone']} | {r['dataset']} | {_fmt_fraction(r['fraction'])} | {r['train_images']} | {r['accuracy']:.2f} | {l2} |")
    lines += ["", f"{h2} Average over datasets", "", "| backbone | " + " | ".join(_fmt_fraction(f) for f in fractions) + " |",
              "|---|" + "---:|" * len(fractions)]
    for backbone, per in averages(rows).items():
        lines.append(f"| {backbone} | " + " | ".join(f"{per[f]:.2f}" for f in fractions) + " |")
    if bias_rows:
        lines += ["", f"{h2} Background gap (ImageNet-9 style; lower is less biased)", "",
                  "| backbone | set | original | mixed_same | mixed_rand | BG_Gap |", "|---|---|---:|---:|---:|---:|"]
        for r in bias_rows:
            lines.append(f"| {r['backbone']} | {r['dataset']} | {r['original']:.2f} | {r['mixed_same']:.2f} | {r['mixed_rand']:.2f} | {r['bg_gap']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict], path: Path) -> None:
    """Accuracy vs. fraction: one panel per dataset plus the average, one line per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    panels = datasets + (["average"] if len(datasets) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    means = averages(rows)
    for ax, panel in zip(axes[0], panels):
        for backbone in means:
            if panel == "average":
                points = sorted(means[backbone].items())
            else:
                points = sorted((r["fraction"], r["accuracy"]) for r in rows if r["backbone"] == backbone and r["dataset"] == panel)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backbone)
        ax.set_xscale("log")
        ax.set_title(panel)
        ax.set_xlabel("fraction of training data")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- driver


def check_inputs(cfg: Config) -> None:
    """Fail before any task starts when a backbone or dataset is missing, or the output unusable."""
    from lbgen.config import ConfigError
    from lbgen.models.backbones import BackboneError, read_meta
    from lbgen.runtime.training import check_output_dir

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
    for dataset in ev.downstream:
        open_downstream(dataset, ev.data_root)
    for root in ev.bias:
        in9_folders(root)


def _run_all(fn, jobs: list[tuple], cfg: Config) -> list:
    """`fn(config, *job)` for every job: as Ray tasks when Ray is up, else in this process."""
    config = dataclasses.asdict(cfg)
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        ray = None
    if ray is None or not ray.is_initialized():
        return [fn(config, *job) for job in jobs]
    ev = cfg.evaluate
    gpus = ev.task_gpus if ev.task_gpus is not None else float(ray.cluster_resources().get("GPU", 0) > 0)
    remote = ray.remote(num_cpus=ev.task_cpus, num_gpus=gpus)(fn)
    return ray.get([remote.remote(config, *job) for job in jobs])


def evaluate(cfg: Config) -> Path:
    """Evaluate every backbone on every downstream (and bias) set; returns the output directory."""
    check_inputs(cfg)
    ev = cfg.evaluate
    output = Path(ev.output).expanduser().resolve()
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(ev, output=str(output)))
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(to_yaml(cfg))

    pairs = [(spec, dataset) for spec in ev.backbone for dataset in ev.downstream]
    rows = [row for result in _run_all(evaluate_pair, pairs, cfg) for row in result]
    bias_rows = _run_all(bias_pair, [(spec, root) for spec in ev.backbone for root in ev.bias], cfg)

    write_results(rows, bias_rows, ev.protocol, output / RESULTS_JSON)  # before results.csv, the completion marker
    if rows:
        write_csv(rows, output / "results.csv", RESULT_FIELDS)
        plot_results(rows, output / "accuracy_vs_fraction.png")
    if bias_rows:
        write_csv(bias_rows, output / "bias.csv", BIAS_FIELDS)
    (output / "results.md").write_text(results_markdown(rows, bias_rows, ev.protocol))
    return output
