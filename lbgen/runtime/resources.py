"""Whether the Ray cluster can hold everything a stage needs at once, checked before the stage starts.

Ray queues a request that no node can satisfy without a word: an actor pool that leaves no CPU for
the tasks feeding it sits at 0 % forever, and a Ray Train placement group retries every minute. So
each stage states its requests (`Request`), and `require` packs them onto the nodes' total resources
first. A cluster lbgen started itself cannot grow, and a plan that does not fit is refused at once;
an attached cluster may autoscale, so lbgen asks its autoscaler for the missing bundles
(`ray.autoscaler.sdk.request_resources`) and waits, saying so, up to `resource_wait_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lbgen.config import ConfigError

# How often a waiting stage says what it still waits for.
REPORT_EVERY_S = 30.0


class ResourceError(ConfigError):
    """The cluster cannot hold what a stage needs at once; the message names the settings and the cluster."""


@dataclass(frozen=True)
class Request:
    """`count` units, each needing `resources` on one node (e.g. 4 generation actors x {CPU: 1, GPU: 0.75})."""

    what: str
    count: int
    resources: dict[str, float]

    def describe(self) -> str:
        return f"{self.count} {self.what} x {format_resources(self.resources)}"


def format_resources(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if v and k not in ("object_store_memory", "memory") and not k.startswith("node:")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def unplaced(requests: Sequence[Request], nodes: Sequence[dict[str, float]]) -> list[str]:
    """What of `requests` does not fit on `nodes` (their total resources) at once: first-fit, largest first.

    Returns one entry per request with units left over, e.g. "1 of 1 scoring actor"."""
    free = [dict(node) for node in nodes]
    units = sorted(((i, r.resources) for i, r in enumerate(requests) for _ in range(r.count)),
                   key=lambda unit: (unit[1].get("GPU", 0), sum(unit[1].values())), reverse=True)
    missing = [0] * len(requests)
    for i, need in units:
        node = next((n for n in free if all(n.get(k, 0) + 1e-9 >= v for k, v in need.items())), None)
        if node is None:
            missing[i] += 1
            continue
        for k, v in need.items():
            node[k] = node.get(k, 0) - v
    return [f"{n} of {r.count} {r.what}" for r, n in zip(requests, missing) if n]


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each live node of the attached cluster (a local one is started if none is
    attached, as Ray Data and Ray Train would on first use)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def cluster_can_grow() -> bool:
    """False for a Ray that this process started (`ray.init()` without an address): it has no autoscaler."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001  Ray has no public "did I start it"
    return not getattr(node, "head", False)


def require(stage: str, requests: Sequence[Request], settings: str, wait_s: float,
            say: Callable[[str], None] = print, ask_for: Sequence[Request] | None = None) -> None:
    """Return once the cluster can hold all `requests` at once; raise ResourceError naming `settings` (the
    flags that size the requests) and the cluster when it cannot, after waiting up to `wait_s` for an
    attached cluster to grow. `ask_for`: what to ask the autoscaler for meanwhile, when more than `requests`
    (a pool that starts small and grows: all its nodes boot at once)."""
    nodes = cluster_nodes()
    missing = unplaced(requests, nodes)
    if not missing:
        return
    if cluster_can_grow() and wait_s > 0:
        missing = _wait_for_growth(stage, requests, wait_s, say, ask_for or requests)
        if not missing:
            return
        nodes = cluster_nodes()  # what the cluster grew to, for the message
    raise ResourceError(
        f"{stage} needs {' + '.join(r.describe() for r in requests)} at once, and the cluster's {len(nodes)} "
        f"node(s) {', '.join(format_resources(n) for n in nodes) or '(none)'} cannot hold {', '.join(missing)}; "
        f"lower {settings}, or run on a larger cluster")


def _bundles(requests: Sequence[Request]) -> list[dict[str, float]]:
    return [dict(r.resources) for r in requests for _ in range(r.count)]


def _wait_for_growth(stage: str, requests: Sequence[Request], wait_s: float, say: Callable[[str], None],
                     ask_for: Sequence[Request]) -> list[str]:
    """Ask the autoscaler for `ask_for` and wait up to `wait_s` for `requests` to fit; what still does not fit.

    The request is made again every second: the cluster holds one resource request, and once any Ray Data job
    has run there, Ray Data's autoscaling coordinator (a cluster-wide actor) replaces it with its own every 20 s,
    so a request made once stopped the nodes from coming (the autoscaler scenario's second generation waited out
    its 120 s on a cluster of one head)."""
    from ray.autoscaler.sdk import request_resources

    start = last_report = time.monotonic()
    say(f"[{stage}] waiting up to {wait_s:g} s for the cluster to grow to {' + '.join(r.describe() for r in requests)}")
    try:
        while True:
            request_resources(bundles=_bundles(ask_for))
            missing = unplaced(requests, cluster_nodes())
            waited = time.monotonic() - start
            if not missing or waited >= wait_s:
                return missing
            if time.monotonic() - last_report >= REPORT_EVERY_S:
                last_report = time.monotonic()
                say(f"[{stage}] still waiting ({waited:.0f}/{wait_s:g} s) for {', '.join(missing)}")
            time.sleep(1.0)
    finally:
        request_resources(bundles=[])  # the stage's own actors and workers hold the nodes from now on


def use_gpu(setting: bool | None) -> bool:
    """A stage's `use_gpu` setting; null means: GPUs when the attached Ray cluster has any."""
    import ray

    if setting is not None:
        return setting
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
