"""Training checkpoints: DeepSpeed's engine state plus what an exact resume needs beyond it.

Layout under run_dir/checkpoints/:
    latest                          the tag of the newest complete checkpoint (DeepSpeed's pointer)
    global_step{N}/                 DeepSpeed: layer_XX-model_states.pt, mp_rank_XX_model_states.pt,
                                    *optim_states.pt; the client state holds step and consumed_samples
    global_step{N}/rng/rank{R}.pt   every rank's RNG states (torch, accelerator, numpy, python)
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from trainer.errors import CheckpointError


def tag_for(step: int) -> str:
    return f"global_step{step}"


def rng_states() -> dict:
    accelerator = get_accelerator()
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if accelerator.device_name() != "cpu":
        states["accelerator"] = accelerator.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "accelerator" in states and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(states["accelerator"])


def save(engine, checkpoint_dir: Path, step: int, consumed_samples: int, extra_rng: Optional[dict] = None) -> Path:
    """Save on every rank (a collective). Returns the checkpoint directory of this step."""
    tag = tag_for(step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag,
                           client_state={"step": step, "consumed_samples": consumed_samples})
    rng_dir = checkpoint_dir / tag / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    torch.save({**rng_states(), "extra": extra_rng}, rng_dir / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    return checkpoint_dir / tag


def load_latest(engine, checkpoint_dir: Path) -> tuple[int, int, Optional[dict]]:
    """Load the newest checkpoint into the engine; returns (step, consumed_samples, extra RNG states)."""
    if not (checkpoint_dir / "latest").is_file():
        raise CheckpointError(f"train.resume=true but {checkpoint_dir} holds no checkpoint: "
                              f"train without resume first, or point train.run_dir at a run that saved one")
    path, client = engine.load_checkpoint(str(checkpoint_dir), load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None or client is None:
        raise CheckpointError(f"could not load the latest checkpoint in {checkpoint_dir}")
    tag = (checkpoint_dir / "latest").read_text().strip()
    rng_file = checkpoint_dir / tag / "rng" / f"rank{dist.get_rank()}.pt"
    extra = None
    if rng_file.is_file():
        states = torch.load(rng_file, weights_only=False)
        extra = states.pop("extra")
        set_rng_states(states)
    return int(client["step"]), int(client["consumed_samples"]), extra
