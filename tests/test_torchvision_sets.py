"""Transfer sets by torchvision name (lbgen/data/torchvision_sets.py), and evaluation on a real dataset:
Fashion-MNIST from Debian's `dataset-fashion-mnist` package, read through `torchvision:FashionMNIST`."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

import lbgen.data.torchvision_sets as tv
from lbgen.data.downstream import open_downstream
from lbgen.errors import DownstreamError


def test_an_unknown_name_is_refused_listing_the_known_ones(tmp_path):
    with pytest.raises(DownstreamError, match=r"'torchvision:Nope': unknown torchvision set; known: FGVCAircraft, StanfordCars, DTD"):
        open_downstream("torchvision:Nope", tmp_path)


def test_a_missing_set_offline_fails_in_seconds_saying_where_its_files_go(tmp_path, monkeypatch):
    monkeypatch.setattr(tv, "_reachable", lambda url: False)  # this host's state, whatever its network
    start = time.perf_counter()
    with pytest.raises(DownstreamError) as refused:
        open_downstream("torchvision:FashionMNIST", tmp_path)
    assert time.perf_counter() - start < 5
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("downstream torchvision:FashionMNIST: not found under ")
    assert f"{tmp_path}/FashionMNIST/raw/ (train-images-idx3-ubyte" in message


def test_the_network_probe_is_bounded_and_answers_both_ways():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert tv._reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused at once
    start = time.perf_counter()
    assert not tv._reachable(f"http://127.0.0.1:{port}")
    assert not tv._reachable("http://no-such-host.invalid")
    assert time.perf_counter() - start < 2 * tv.PROBE_TIMEOUT_S


def test_sets_without_a_split_get_a_seeded_stratified_one():
    targets = np.repeat(np.arange(4), [10, 20, 5, 1])
    test = tv.stratified_test_indices(targets)
    assert np.array_equal(test, tv.stratified_test_indices(targets))  # the same for every run
    counts = np.bincount(targets[test], minlength=4)
    assert counts.tolist() == [2, 4, 1, 0]  # 20 % of each class; a class of one stays in train
    assert len(np.unique(test)) == len(test)


def test_every_named_set_is_a_torchvision_class():
    import torchvision.datasets

    assert all(hasattr(torchvision.datasets, name) for name in tv.SETS)
    assert {"FGVCAircraft", "StanfordCars", "DTD", "EuroSAT", "Flowers102", "OxfordIIITPet", "Food101", "SUN397"} <= set(tv.SETS)


def test_fashion_mnist_opens_with_its_standard_split(fashion_mnist_root):
    train, test = open_downstream("torchvision:FashionMNIST", fashion_mnist_root)
    assert len(train.targets) == 60000 and len(test.targets) == 10000
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    pixels = train.pixels(0)
    assert tuple(pixels.shape) == (3, 28, 28) and str(pixels.dtype) == "torch.uint8" and int(pixels.max()) > 0
