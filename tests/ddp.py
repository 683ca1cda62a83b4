"""Test helper: a function run on two gloo DDP ranks in plain torch.multiprocessing (no Ray Train job)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable


def run_on_two_ranks(fn: Callable, *args) -> None:
    """`fn(rank, *args)` on ranks 0 and 1 of a gloo process group, each in its own process with one torch thread
    (as a 1-CPU Ray Train worker runs); `fn` must be importable by name (a module-level function)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, fn, args), nprocs=2)


def _rank(rank: int, port: int, fn: Callable, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # Two ranks of torch's default two threads each on two cores made every step take five times the CPU.
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()
