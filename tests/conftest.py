"""Shared test fixtures."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session: 2 CPUs, no dashboard, workers' logs kept out of pytest's output."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes a token under $HOME
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
