"""Resume on any layout: a layout-free training state (trainer/checkpoint/universal.py, read from a checkpoint of
any (tp, pp, dp, ep)) loaded into this run's live engine (the routed experts: this rank's ep block). Each rank sets its shard of every weight, fp32 master
weight and Adam moment through DeepSpeed's safe_set_full_fp32_param / safe_set_full_optimizer_state, so ZeRO
re-partitions them for the new data-parallel size itself; then the LR schedule and the engine's counters.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from trainer.checkpoint.expert_files import checkpoint_ep
from trainer.checkpoint.layout import rule_for, shard
from trainer.checkpoint.pipeline_files import (Layout, canonical_name, checkpoint_offloads_optimizer, checkpoint_zero_stage,
                                               has_deepspeed_optimizer_files, is_pipeline_checkpoint, read_layout)
from trainer.checkpoint.universal import LAYOUT_FREE_OPTIMIZER, MOMENTS, TrainingState, read_training_state
from trainer.engine import deepspeed_compat
from trainer.engine.grad_norm import is_expert_parallel
from trainer.model.config import ModelConfig
from trainer.parallel.topology import Topology

log = logging.getLogger("glm.checkpoint")


def load_into_engine(engine, topology: Topology, config: ModelConfig, state: TrainingState) -> None:
    """Set this rank's shard of every weight, master weight and Adam moment, the LR schedule and counters."""
    optimizer = engine.optimizer
    zero = deepspeed_compat.is_zero_optimizer(optimizer)
    zero3 = engine.zero_optimization_stage() == 3
    if state.moments is not None and zero:
        deepspeed_compat.initialise_zero_moments(optimizer, state.optimizer_step, MOMENTS)
    for pipeline_name, param in engine.module.named_parameters():
        name = canonical_name(pipeline_name, config)
        rule = rule_for(name, config)
        block = _ep_block if is_expert_parallel(param) else _whole
        value = block(shard(state.weights[name], rule, config, topology.tp, topology.tp_rank), topology).to(param.device)
        if zero3:
            deepspeed_compat.set_zero3_weight(param, value)
        else:
            with torch.no_grad():
                param.copy_(value)
        if zero:
            safe_set_full_fp32_param(param, value)
        if state.moments is None:
            continue
        moments = {key: block(shard(state.moments[key][name], rule, config, topology.tp, topology.tp_rank),
                              topology).to(param.device) for key in MOMENTS}
        if zero:
            for key, moment in moments.items():
                safe_set_full_optimizer_state(param, moment, key)
        else:
            optimizer.state[param] = {"step": torch.tensor(float(state.optimizer_step)), **moments}
    if not zero:
        deepspeed_compat.refresh_master_weights(optimizer)
    _load_buffers(engine, topology, config, state)
    _load_schedule_and_counters(engine, state.client)


def _load_buffers(engine, topology: Topology, config: ModelConfig, state: TrainingState) -> None:
    """This rank's shard of every persistent buffer the state holds (the routers' expert_bias: aux-loss-free
    balancing's, moved by the steps so far), which the checkpoint's model files hold (trainer/checkpoint/universal.py
    adds them to ZeRO's fp32 partitions, which hold the parameters only)."""
    for pipeline_name, buffer in engine.module.named_buffers():
        name = canonical_name(pipeline_name, config)
        if name in state.weights:
            value = shard(state.weights[name], rule_for(name, config), config, topology.tp, topology.tp_rank)
            with torch.no_grad():
                buffer.copy_(value.to(buffer.device, buffer.dtype))


def _ep_block(experts: torch.Tensor, topology: Topology) -> torch.Tensor:
    """All E experts (dim 0) -> this rank's contiguous block of E / ep (trainer/parallel/expert_dispatch.py)."""
    return experts.chunk(topology.ep, dim=0)[topology.ep_rank]


def _whole(tensor: torch.Tensor, topology: Topology) -> torch.Tensor:
    return tensor


def _load_schedule_and_counters(engine, client: dict) -> None:
    scheduler = engine.lr_scheduler
    if client["lr_scheduler"] is not None and scheduler is not None:
        scheduler.load_state_dict(client["lr_scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the next step's lr; DeepSpeed's own load restores it with the optimizer groups
    engine.global_steps = int(client["global_steps"] or 0)
    engine.global_samples = int(client["global_samples"] or 0)
    engine.skipped_steps = int(client["skipped_steps"] or 0)


def deepspeed_can_load(engine, topology: Topology, tag_dir: Path) -> bool:
    """Whether DeepSpeed's own load_checkpoint restores tag_dir exactly (RNG states included): it was written by
    this very layout and engine, with the same optimizer files (ZeRO stage, offload), and none of DeepSpeed's
    own loading gaps applies."""
    # DeepSpeed's data axis is dp x cp (engine/ds_topology.py): a checkpoint is written as if cp were dp, so it
    # resumes at any cp (trainer/parallel/context.py) and DeepSpeed loads it itself where dp x cp is the same.
    same_layout = (read_layout(tag_dir) == Layout(topology.tp, topology.pp, topology.dp * topology.cp)
                   and is_pipeline_checkpoint(tag_dir) == (topology.pp > 1))  # and the same engine
    # The same optimizer class too: DeepSpeed's own load hands torch AdamW's parameter groups to DeepSpeedCPUAdam
    # (or back) when optim.offload_optimizer changed, and CPUAdam's step then fails on a missing group key.
    same_optimizer = (has_deepspeed_optimizer_files(tag_dir) == bool(engine.zero_optimization())
                      and checkpoint_zero_stage(tag_dir) == engine.zero_optimization_stage()
                      and checkpoint_offloads_optimizer(tag_dir) == engine.zero_use_cpu_optimizer())
    # DeepSpeed 0.19.8 cannot load its own bf16 checkpoints without ZeRO into a pipeline engine (its bf16
    # optimizer's load_state_dict fails on the saved state): those go through this module, weights only.
    # Nor its own checkpoints under optimizer offload nvme: its load_checkpoint then skips the ZeRO optimizer files and
    # only copies the swap files back, so the sub-groups kept in host memory restart from the new run's values (a
    # 4 + 4 step resume at dp=2 ZeRO-3 lost 0.012 on step 5's loss); this module reads both.
    deepspeed_loads = same_optimizer and not (engine.bfloat16_enabled() and not engine.zero_optimization()
                                              and topology.pp > 1) and not engine.zero_nvme_offload_optimizer()
    # At ep > 1 DeepSpeed's files hold data rank 0's experts only, and its own load would give them to every rank.
    no_experts = topology.ep == 1 and checkpoint_ep(tag_dir) == 1
    return same_layout and deepspeed_loads and no_experts and not (tag_dir / LAYOUT_FREE_OPTIMIZER).is_file()


def load_any_layout(engine, topology: Topology, config: ModelConfig, checkpoint_dir: Path,
                    tag: str) -> Optional[tuple[int, int]]:
    """The engine's resume hook. When DeepSpeed can load checkpoint_dir/tag itself (deepspeed_can_load), return
    None. Otherwise load it here and return (step, consumed_samples). RNG states are not carried across
    layouts (with dropout > 0 the dropout masks differ from the uninterrupted run)."""
    tag_dir = Path(checkpoint_dir) / tag
    if deepspeed_can_load(engine, topology, tag_dir):
        return None
    state = read_training_state(tag_dir, config)
    if state.moments is None:
        log.warning(f"warning: {tag_dir} holds no Adam state this trainer can read on another layout; "
                    f"the weights are loaded and the Adam moments start from zero")
    load_into_engine(engine, topology, config, state)
    return int(state.client["step"] or 0), int(state.client["consumed_samples"] or 0)
