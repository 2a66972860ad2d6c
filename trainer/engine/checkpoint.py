"""Training checkpoints that cannot be half-written, and exact resume.

Layout under run_dir/checkpoints/:
    latest                          the tag of the newest complete checkpoint (written last, atomically)
    global_step{N}/                 DeepSpeed's files (layer_XX-model_YY-model_states.pt per layer and
                                    tensor rank, mp_rank_XX_model_states.pt with the client state: step and
                                    consumed_samples, *optim_states.pt shards, the LR schedule)
    global_step{N}/rng/rank{R}.pt   every rank's RNG states (torch CPU and accelerator, the model-parallel
                                    tracker, numpy, python)
    global_step{N}/manifest.json    size and CRC-32 of every file, written after all of them

A save goes to `.global_step{N}.partial/`, every file is fsynced, the manifest is written, the directory
is renamed to `global_step{N}` and only then does `latest` move (temporary file + rename). A load checks
the manifest of `latest` and walks back to the newest checkpoint whose files all match, with a warning.
"""
from __future__ import annotations

import errno
import json
import math
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from trainer.checkpoint.ds_format import client_state
from trainer.checkpoint.expert_files import expert_file
from trainer.checkpoint.manifest import fsync, verify, write_atomic, write_manifest
from trainer.checkpoint.run_record import DATA_POSITION, RUN_RECORD
from trainer.checkpoint.tags import LATEST, latest_tag, list_tags, resume_order, tag_for
from trainer.checkpoint.universal import MOMENTS
from trainer.engine.deepspeed_compat import is_zero_optimizer, link_zero_moments, zero_adam_step
from trainer.engine.grad_norm import is_expert_parallel
from trainer.engine.resume import load_any_layout
from trainer.errors import CheckpointError
from trainer.paths import nearest_existing
from trainer.parallel import random as parallel_random
from trainer.parallel.comm import barrier, broadcast_object, global_rank, world_group
from trainer.parallel.topology import Topology

log = logging.getLogger("glm.checkpoint")


def rng_states() -> dict:
    """torch (CPU, accelerator, model-parallel tracker), numpy and python states of this rank."""
    return {"torch": parallel_random.get_rng_states(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    parallel_random.set_rng_states(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def optimizer_param_names(engine) -> Optional[list[list[str]]]:
    """The pipeline names of a plain torch optimizer's parameters, group by group (its state dict numbers
    them in this order): what lets a checkpoint without ZeRO resume on another layout. None under ZeRO or
    DeepSpeed's fp16/bf16 optimizers, whose files name their parameters themselves."""
    if not isinstance(engine.optimizer, torch.optim.Optimizer):
        return None
    names = {id(param): name for name, param in engine.module.named_parameters()}
    return [[names[id(param)] for param in group["params"]] for group in engine.optimizer.param_groups]


FULL_BELOW = 1 << 20
"""A file system with less than this free after a failed write is taken to be full."""


def disk_full_error(error: BaseException, staging: Path) -> Optional[CheckpointError]:
    """The error to report for a checkpoint write that failed because the disk is full (ENOSPC, or torch.save's
    "unexpected pos" with no space left), or None for any other failure."""
    full = getattr(error, "errno", None) == errno.ENOSPC or shutil.disk_usage(nearest_existing(staging)).free < FULL_BELOW
    if not full:
        return None
    return CheckpointError(f"no space left on device writing the checkpoint {staging}: free space on that file system "
                           f"(or set train.keep_checkpoints), then resume from the last complete checkpoint")


def save_experts(engine, topology: Topology, tag_dir: Path) -> None:
    """At ep > 1, expert-data rank 0 of every (ep, pp, tp) coordinate writes its block of the routed experts, with
    their Adam moments where the optimizer has them (trainer/checkpoint/expert_files.py). Under ZeRO-1/2 the fp32
    master weights and moments are partitioned over the expert-data group: every rank of it takes part in
    gathering them."""
    if topology.ep == 1:
        return
    zero = is_zero_optimizer(engine.optimizer)
    if not zero and topology.edp_rank != 0:
        return
    experts = [(name, param) for name, param in engine.module.named_parameters() if is_expert_parallel(param)]
    tensors, step = {}, 0
    if zero:
        step = zero_adam_step(engine.optimizer)
        if step is not None:
            link_zero_moments(engine.optimizer)
        for name, param in experts:  # collectives over the expert-data group, in the same order on its ranks
            moments = {key: safe_get_full_optimizer_state(param, key) for key in MOMENTS} if step is not None else {}
            tensors[name] = {"fp32": safe_get_full_fp32_param(param).cpu(),
                             **{key: moment.cpu() for key, moment in moments.items()}}
        step = step or 0
    else:
        for name, param in experts:
            state = engine.optimizer.state.get(param, {}) if isinstance(engine.optimizer, torch.optim.Optimizer) else {}
            tensors[name] = {"fp32": param.detach().float().cpu(),
                             **{key: state[key].cpu() for key in MOMENTS if key in state}}
            step = int(state["step"]) if "step" in state else step
    if topology.edp_rank == 0:
        mp_rank = topology.pp_rank * topology.tp + topology.tp_rank
        torch.save({"ep": topology.ep, "step": step, "tensors": tensors}, expert_file(tag_dir, topology.ep_rank, mp_rank))


def save(engine, checkpoint_dir: Path, step: int, consumed_samples: int, keep: int = 0,
         data_position: Optional[dict] = None, run_record: Optional[dict] = None,
         topology: Optional[Topology] = None) -> Path:
    """Save on every rank (a collective); returns the final directory. keep > 0 prunes older ones.
    data_position (the packing plan's scan state at the next row, trainer/data/packing.py) goes to
    DATA_POSITION, run_record (the model config, the layout, the tokenizer's fingerprint:
    trainer/checkpoint/run_record.py) to RUN_RECORD, beside the weights; at ep > 1 (`topology`) the expert
    blocks of every ep rank beside DeepSpeed's files (save_experts)."""
    tag, staging = tag_for(step), f".{tag_for(step)}.partial"
    rank = global_rank()
    if rank == 0 and (checkpoint_dir / staging).exists():
        shutil.rmtree(checkpoint_dir / staging)
    barrier(world_group())
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=staging, save_latest=False,
                               client_state=client_state(step, consumed_samples, optimizer_param_names(engine)))
        if topology is not None:
            save_experts(engine, topology, checkpoint_dir / staging)
        rng_dir = checkpoint_dir / staging / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rng_states(), rng_dir / f"rank{rank}.pt")
    except (OSError, RuntimeError) as error:
        raise disk_full_error(error, checkpoint_dir / staging) or error
    barrier(world_group())
    final = checkpoint_dir / tag
    if rank == 0:
        if data_position is not None:
            (checkpoint_dir / staging / DATA_POSITION).write_text(json.dumps(data_position))
        if run_record is not None:
            (checkpoint_dir / staging / RUN_RECORD).write_text(json.dumps(run_record, indent=1))
        write_manifest(checkpoint_dir / staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(checkpoint_dir / staging, final)
        fsync(checkpoint_dir)
        write_atomic(checkpoint_dir / LATEST, tag)
        if keep > 0:
            for old in list_tags(checkpoint_dir)[keep:]:
                shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    barrier(world_group())
    return final


def choose_tag(checkpoint_dir: Path) -> str:
    """The newest checkpoint that verifies, agreed by all ranks (rank 0 decides)."""
    choice: list = [None]
    if global_rank() == 0:
        candidates = resume_order(checkpoint_dir)
        named = latest_tag(checkpoint_dir)
        if named is not None and named not in candidates:
            log.warning(f"warning: {checkpoint_dir / LATEST} names {named!r}, which is not a checkpoint there; "
                        f"resuming from the newest complete one instead")
        for number, tag in enumerate(candidates):
            problem = verify(checkpoint_dir / tag)
            if problem is None:
                choice[0] = tag
                break
            fallback = "falling back to the previous one" if number + 1 < len(candidates) else "no other checkpoint is left"
            log.warning(f"warning: checkpoint {checkpoint_dir / tag} is unusable ({problem}); {fallback}")
    choice[0] = broadcast_object(choice[0], group=world_group())
    if choice[0] is None:
        raise CheckpointError(f"train.resume=true but {checkpoint_dir} holds no complete checkpoint: "
                              f"train without resume first, or point train.run_dir at a run that saved one")
    return choice[0]


def load_latest(engine, checkpoint_dir: Path, topology, model_config) -> tuple[int, Optional[dict]]:
    """Load the newest good checkpoint into the engine; returns (step, its data position or None). A
    checkpoint written by another (tp, pp, dp) layout is resharded on the fly, optimizer state included."""
    tag = choose_tag(checkpoint_dir)
    position_file = checkpoint_dir / tag / DATA_POSITION
    position = json.loads(position_file.read_text()) if position_file.is_file() else None
    base_lrs = list(engine.lr_scheduler.base_lrs)  # this run's peak lr, before the checkpoint's replaces it
    step = _load_tag(engine, checkpoint_dir, tag, topology, model_config)
    follow_schedule(engine.lr_scheduler, base_lrs)
    return step, position


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float]) -> None:
    """Make the next step's lr this run's schedule at the resumed step: the checkpoint holds the lr of the run
    that wrote it, whose cosine ended at its own train.steps (a resume with a larger train.steps, or another
    optim.lr, would start at that lr). The lr is then a function of the config and the step alone."""
    scheduler.base_lrs = list(base_lrs)
    saved = scheduler.optimizer.param_groups[0]["lr"]
    for group, multiplier, base in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, base_lrs):
        group["lr"] = base * multiplier(scheduler.last_epoch)
    now = scheduler.optimizer.param_groups[0]["lr"]
    if not math.isclose(saved, now, rel_tol=1e-6) and global_rank() == 0:
        log.warning(f"the LR schedule differs from the checkpoint's (train.steps, optim.lr or the schedule keys "
                    f"changed): step {scheduler.last_epoch + 1} trains at lr {now:.3e} instead of {saved:.3e}; to keep "
                    f"the old cosine set optim.decay_steps to its length (docs/CONFIG.md)")


def _load_tag(engine, checkpoint_dir: Path, tag: str, topology, model_config) -> int:
    """Weights, optimizer, schedule and RNG states of checkpoint `tag`; returns its step."""
    resharded = load_any_layout(engine, topology, model_config, checkpoint_dir, tag)
    if resharded is not None:
        log.warning(f"resumed {checkpoint_dir / tag} on a new layout (tp={topology.tp}, pp={topology.pp}, "
                    f"dp={topology.dp}); RNG states restart from the seed")
        return resharded[0]
    path, client = engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None or client is None:
        raise CheckpointError(f"DeepSpeed could not load {checkpoint_dir / tag}: was it written by another layout?")
    rng_file = checkpoint_dir / tag / "rng" / f"rank{global_rank()}.pt"
    if rng_file.is_file():
        set_rng_states(torch.load(rng_file, weights_only=False))
    return int(client["step"])
