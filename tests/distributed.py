"""Run a test function on N CPU processes with gloo, and fail the test if any rank fails."""
from __future__ import annotations

import os
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.engine.rendezvous import free_port


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:  # report every failure to the parent, including assertion errors
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> None:
    """Call fn(rank, world_size, *args) in world_size spawned processes; fn must be importable (top level)."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    for p in procs:
        if p.is_alive():
            p.kill()
    if failures:
        rank, text = failures[0]
        raise AssertionError(f"rank {rank} failed:\n{text}")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    assert not bad, f"a rank exited with {bad}"
