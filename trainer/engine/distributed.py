"""Start torch.distributed the same way whether a launcher set the environment or not."""
from __future__ import annotations

import os
from datetime import timedelta

import deepspeed
from deepspeed.accelerator import get_accelerator

from trainer.engine.rendezvous import free_port
from trainer.parallel.comm import global_rank, group_size, world_group


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Initialise the default process group; returns (rank, world_size).

    Run directly (no RANK in the environment) this is the single-device debug mode: a one-process
    group on a free local port, so the same DeepSpeed code path runs on a laptop.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    # Also when torch.distributed is already up (a test harness, an embedding program): DeepSpeed's
    # communication backend wraps the existing group then.
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=timedelta(minutes=timeout_minutes), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank)
    return global_rank(), group_size(world_group())


def local_device():
    """This rank's device, through DeepSpeed's accelerator abstraction."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return accelerator.device_name()
    return accelerator.device_name(int(os.environ.get("LOCAL_RANK", "0")))
