"""Fail-fast access to the Hugging Face hub.

Hub clients retry for most of a minute when the network is down. lbgen probes
the hub once (a TCP connect with a short timeout) and, when it is unreachable,
switches the hub client to offline mode for the load, so that a model that is
not in the local cache fails at once with a message saying how to provide it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from urllib.parse import urlparse

from lbgen.errors import ModelNotFoundError, UnsafeWeightsError  # noqa: F401  (raised here; defined with the others)

PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=None)
def hub_reachable(endpoint: str | None = None) -> bool:
    """Whether a TCP connection to the hub endpoint opens within PROBE_TIMEOUT_S."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    url = urlparse(endpoint or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_access():
    """Within the block, hub lookups go online only if the hub answers; else cache only."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not hub_reachable()
    try:
        yield not constants.HF_HUB_OFFLINE
    finally:
        constants.HF_HUB_OFFLINE = saved


def is_local_path(name: str) -> bool:
    """A name that points at the file system rather than the hub."""
    # Hub ids are "org/name": one slash, no leading dot or slash.
    return os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or name.count("/") > 1


def not_found(kind: str, name: str, how: str, err: Exception | None = None) -> ModelNotFoundError:
    from huggingface_hub import constants

    cause = f" ({type(err).__name__}: {str(err).splitlines()[0][:300]})" if err else ""
    where = "the hub is unreachable" if not hub_reachable() else "the hub did not provide it"
    return ModelNotFoundError(
        f"{kind} {name!r} was not found: it is not a local path, not in the local cache "
        f"({constants.HF_HUB_CACHE}), and {where}{cause}. {how}"
    )


@contextlib.contextmanager
def weights_only_loads():
    """Within the block every `torch.load` is `weights_only=True`, even where a library passes False
    (pyiqa does): a pickled weights file cannot run code. Refusals raise `pickle.UnpicklingError`."""
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved
