"""Transfer sets by torchvision's own name (`--downstream torchvision:DTD`), under `evaluate.data_root`.

Each entry says how torchvision's class is split into train and test: its standard split where it
has one (the paper's eight sets: FGVCAircraft, StanfordCars, DTD, EuroSAT, Flowers102, OxfordIIITPet,
Food101, SUN397; plus FashionMNIST and CIFAR10/100). EuroSAT and SUN397 have none in torchvision:
they get a seeded stratified split, `STRATIFIED_TEST_SHARE` of each class for test, the same for
every backbone and run (seed 0, independent of the run's seed).

A set missing under the data root is downloaded by torchvision when the network allows it; offline,
it is refused in seconds with one line saying where its files go.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from lbgen.errors import DownstreamError

PREFIX = "torchvision:"
STRATIFIED_TEST_SHARE = 0.2
STRATIFIED_SPLIT_SEED = 0
# How long the network probe may take before a missing set is refused as offline.
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class TorchvisionSet:
    """How to open one torchvision dataset class as a (train, test) pair."""

    # Keyword arguments of the train and test splits; None: no split in torchvision (stratified here).
    train: dict | None
    test: dict | None
    # Where torchvision looks below the data root, for the "place the files" message.
    layout: str
    # A host the download comes from (probed before downloading).
    source: str
    # Extra keyword arguments for every split.
    extra: dict = field(default_factory=dict)


SETS: dict[str, TorchvisionSet] = {
    "FGVCAircraft": TorchvisionSet({"split": "trainval"}, {"split": "test"}, "fgvc-aircraft-2013b/", "https://www.robots.ox.ac.uk"),
    "StanfordCars": TorchvisionSet({"split": "train"}, {"split": "test"}, "stanford_cars/ (devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat)", "https://ai.stanford.edu"),
    "DTD": TorchvisionSet({"split": "train"}, {"split": "test"}, "dtd/dtd/ (images/, labels/)", "https://www.robots.ox.ac.uk"),
    "EuroSAT": TorchvisionSet(None, None, "eurosat/2750/<class>/*.jpg", "https://huggingface.co"),
    "Flowers102": TorchvisionSet({"split": "train"}, {"split": "test"}, "flowers-102/ (jpg/, imagelabels.mat, setid.mat)", "https://www.robots.ox.ac.uk"),
    "OxfordIIITPet": TorchvisionSet({"split": "trainval"}, {"split": "test"}, "oxford-iiit-pet/ (images/, annotations/)", "https://www.robots.ox.ac.uk"),
    "Food101": TorchvisionSet({"split": "train"}, {"split": "test"}, "food-101/ (images/, meta/)", "http://data.vision.ee.ethz.ch"),
    "SUN397": TorchvisionSet(None, None, "SUN397/ (ClassName.txt and the class folders)", "https://vision.princeton.edu"),
    "FashionMNIST": TorchvisionSet({"train": True}, {"train": False}, "FashionMNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, uncompressed)", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"),
    "CIFAR10": TorchvisionSet({"train": True}, {"train": False}, "cifar-10-batches-py/", "https://www.cs.toronto.edu"),
    "CIFAR100": TorchvisionSet({"train": True}, {"train": False}, "cifar-100-python/", "https://www.cs.toronto.edu"),
}


def is_torchvision(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def set_name(spec: str) -> str:
    """The dataset class named by `torchvision:NAME`; unknown names are refused, listing the known ones."""
    name = str(spec)[len(PREFIX):]
    if name not in SETS:
        raise DownstreamError(f"downstream {spec!r}: unknown torchvision set; known: {', '.join(SETS)}")
    return name


class TorchvisionImages:
    """One split of a torchvision dataset as lbgen's image sets: `classes`, `targets`, `pixels(i)`."""

    def __init__(self, dataset, indices: np.ndarray | None = None):
        self.dataset = dataset
        targets = _targets(dataset)
        self.indices = np.arange(len(targets)) if indices is None else np.asarray(indices)
        self.targets = np.asarray(targets, dtype=np.int64)[self.indices]
        self.classes = [str(c) for c in getattr(dataset, "classes", range(int(self.targets.max()) + 1))]

    def pixels(self, i: int) -> torch.Tensor:
        image = self.dataset[int(self.indices[i])][0]  # a PIL image: torchvision decodes each format its own way
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _targets(dataset) -> list[int]:
    """Labels without decoding images: the attribute each torchvision class keeps them in."""
    for attribute in ("targets", "_labels", "labels", "y"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return [int(v) for v in values]
    if hasattr(dataset, "_samples"):  # StanfordCars, EuroSAT (ImageFolder-based keep .targets)
        return [int(label) for _, label in dataset._samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def stratified_test_indices(targets: np.ndarray, share: float = STRATIFIED_TEST_SHARE, seed: int = STRATIFIED_SPLIT_SEED) -> np.ndarray:
    """`share` of each class's indices (at least one, never all of a class of 2+), drawn by `seed`; sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        count = min(len(members) - 1, max(1, round(share * len(members)))) if len(members) > 1 else 0
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


def open_torchvision(spec: str, data_root: str | Path) -> tuple[TorchvisionImages, TorchvisionImages]:
    """(train, test) of `torchvision:NAME` under `data_root`, downloaded first when missing and online."""
    name = set_name(spec)
    entry = SETS[name]
    root = Path(data_root).expanduser()
    if entry.train is None:
        whole = _construct(name, entry, root, {})
        test = stratified_test_indices(np.asarray(_targets(whole)))
        train = np.setdiff1d(np.arange(len(whole)), test)
        return TorchvisionImages(whole, train), TorchvisionImages(whole, test)
    return TorchvisionImages(_construct(name, entry, root, entry.train)), TorchvisionImages(_construct(name, entry, root, entry.test))


def _construct(name: str, entry: TorchvisionSet, root: Path, split: dict):
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name)
    kwargs = {"root": str(root), **entry.extra, **split}
    try:
        return cls(**kwargs, download=False)
    except (RuntimeError, FileNotFoundError, OSError):
        pass  # not there (each class words it its own way): download, or say where the files go
    if not _reachable(entry.source):
        raise DownstreamError(
            f"downstream {PREFIX}{name}: not found under {root} and {urlparse(entry.source).hostname} cannot be "
            f"reached to download it; place its files as torchvision expects: {root}/{entry.layout}")
    try:
        return cls(**kwargs, download=True)
    except Exception as err:  # noqa: BLE001  torchvision's downloaders raise many types
        raise DownstreamError(f"downstream {PREFIX}{name}: download into {root} failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None


def _reachable(url: str) -> bool:
    """Whether a TCP connection to `url`'s host opens within `PROBE_TIMEOUT_S`, name lookup included
    (a resolver that hangs offline is not waited for: the probe runs in a daemon thread)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[bool] = []

    def probe():
        try:
            with socket.create_connection((parsed.hostname, port), timeout=PROBE_TIMEOUT_S):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return outcome == [True]
