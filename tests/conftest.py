"""Shared fixtures: a real local Ray for the tests that need one, and the tiny config."""

from __future__ import annotations

import logging
import os

import pytest

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster (2 CPUs) for the whole session."""
    import ray

    # Ray workers import train functions defined in test modules by module name.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_cfg():
    """A factory: the tiny preset with nested overrides."""
    from lbgen.config import resolve

    def make(**sections):
        return resolve("tiny", overrides=sections)

    return make
