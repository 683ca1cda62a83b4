"""TEST ONLY fault injection: a worker process dies hard, once, at a named point of a stage.

`tests/` use it to prove that a stage survives the death of a Ray worker: Ray Data
restarts a dead generation actor and retries its batch; Ray Train restores a dead
training worker from the last checkpoint. The fault is the `fault` section of the
config (off by default, no CLI flag), because the config already travels to every
actor and train worker; an environment variable set after `ray.init` would not.
"""

from __future__ import annotations

import os
from collections import Counter

_visits: Counter = Counter()  # per process: how often each point was reached


def maybe_die(fault, point: str) -> None:
    """Exit this process at once, like `kill -9` or the OOM killer, on the `fault.after`-th visit to `point`.

    `fault` is a `FaultConfig`. It fires once over all processes: the process that creates
    `fault.marker` dies; a restarted worker (or another rank) finds the marker and lives on.
    """
    if fault.point != point:
        return
    _visits[point] += 1
    if _visits[point] != fault.after:
        return
    try:
        os.close(os.open(fault.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)  # no cleanup, no exception: Ray sees a dead process, not an error
