"""Spawn a few CPU worker processes joined by a gloo process group, with a hard timeout.

Worker functions must live in an importable module (not a test file): the spawned
interpreter finds them by module name, through the ``sys.path`` it inherits.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Collectives give up after this long, so a rank waiting on a dead peer errors out.
COLLECTIVE_TIMEOUT_S = 45.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # Two ranks share a small machine: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        fn(rank, world_size, *args)
        # Leave together: a rank tearing down while its peer still talks to it (rank 0
        # hosts the TCP store) can abort the peer's process at exit.
        dist.barrier()
    finally:
        # DDP reducers left in reference cycles would otherwise be destroyed during
        # interpreter shutdown, after the process group, which can abort the process.
        gc.collect()
        dist.destroy_process_group()


def run_workers(
    fn: Callable[..., None], *args: Any, world_size: int = 2, timeout: float = 90.0
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    A worker's exception is re-raised here (with its traceback); if the workers are not
    all done after ``timeout`` seconds they are killed and ``TimeoutError`` is raised, so
    a hang fails the test instead of blocking the run. A port taken by another process
    between :func:`free_port` and rank 0's bind is retried with a new port.
    """
    for attempt in range(3):
        try:
            _spawn(fn, args, world_size, free_port(), timeout)
            return
        except mp.ProcessRaisedException as e:
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise


def _spawn(
    fn: Callable[..., None], args: tuple, world_size: int, port: int, timeout: float
) -> None:
    ctx = mp.start_processes(
        _entry,
        args=(fn, world_size, port, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{getattr(fn, '__name__', fn)}: workers still running after {timeout:.0f} s"
                )
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
