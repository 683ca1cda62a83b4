"""Shared fixtures. `ray_local`: one real local Ray for the session (2 CPUs, no dashboard)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by every test that asks for it; shut down at the end."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
