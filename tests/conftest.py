"""Shared fixtures: a real local Ray for the tests that need one, a local S3 server (moto), and the tiny config."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller polls its workers every 2 s, which a test's seconds-long run spends waiting
# for the poll that sees it finish; Ray passes the setting on to the controller and its workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Dummy credentials for the local S3 server (moto, the `s3` fixture), set before any Ray starts:
# Ray workers inherit the environment the cluster started with, and read shards from it too.
for _name, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_name, _value)

# The real Fashion-MNIST, as Debian's `dataset-fashion-mnist` installs it (.ci/run does, as root).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


SCENARIOS = pytest.StashKey()


def pytest_collection_modifyitems(items):
    """The tests that read a background scenario run last: by then it has finished, and meanwhile it ran beside the others."""
    items.sort(key=lambda item: item.get_closest_marker("scenario") is not None)  # stable: order kept otherwise


def pytest_collection_finish(session):
    """Start the scenarios (tests/scenarios.py) that the selected tests read (`@pytest.mark.scenario(NAME)`)."""
    names = list(dict.fromkeys(mark.args[0] for item in session.items for mark in item.iter_markers("scenario")))
    if names and not session.config.option.collectonly:
        from scenarios import Scenarios

        session.config.stash[SCENARIOS] = Scenarios(names)


def pytest_terminal_summary(terminalreporter, config):
    """Each background scenario's wall time: they run beside the other tests, so --durations does not show them."""
    if SCENARIOS in config.stash and config.stash[SCENARIOS].seconds:
        terminalreporter.write_line("background scenarios (s): " + json.dumps(config.stash[SCENARIOS].seconds))


def pytest_sessionfinish(session):
    if SCENARIOS in session.config.stash:
        session.config.stash[SCENARIOS].close()


@pytest.fixture
def scenario(request) -> dict:
    """The result of the test's scenario, waiting for it to finish."""
    return request.config.stash[SCENARIOS].result(request.node.get_closest_marker("scenario").args[0])


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """A test that sets torch's thread count (process-wide) leaves the rest of the session at its own:
    an in-process generation actor sets 1, and every later in-process test then ran on one core."""
    import sys

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    yield
    if threads is not None:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster (2 CPUs) for the whole session."""
    import ray

    # Ray workers import train functions defined in test modules by module name.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    if ray.is_initialized():  # started by an earlier in-process CLI run: its workers cannot import the test modules
        ray.shutdown()
    from scenarios import local_ray

    with local_ray():
        yield ray


@pytest.fixture
def one_torch_thread():
    """torch on one thread for this test only (set_num_threads is process-wide: the rest of the session keeps its own)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory) -> Path:
    """A data root holding the real Fashion-MNIST in torchvision's layout, from Debian's package."""
    import gzip

    if not all((DEBIAN_FASHION_MNIST / f"{name}.gz").exists() for name in FASHION_MNIST_FILES):
        pytest.skip(f"Fashion-MNIST is not installed under {DEBIAN_FASHION_MNIST} (apt install dataset-fashion-mnist; .ci/run does as root)")
    root = tmp_path_factory.mktemp("datasets")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FASHION_MNIST_FILES:
        (raw / name).write_bytes(gzip.decompress((DEBIAN_FASHION_MNIST / f"{name}.gz").read_bytes()))
    return root


S3_BUCKET = "lbgen-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with one bucket (`S3_BUCKET`); returns `key -> s3:// URI` carrying the endpoint."""
    import pyarrow.fs as pafs

    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    pafs.FileSystem.from_uri(f"s3://{S3_BUCKET}{query}&allow_bucket_creation=true")[0].create_dir(S3_BUCKET)
    yield lambda key: f"s3://{S3_BUCKET}/{key}{query}"
    server.stop()


@pytest.fixture
def tiny_cfg():
    """A factory: the tiny preset with nested overrides (`tests/configs.py`)."""
    from configs import tiny

    return tiny
