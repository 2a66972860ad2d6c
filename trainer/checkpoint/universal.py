"""The layout-free training state, read from a DeepSpeed checkpoint of any (tp, pp, dp) and loaded into a
live engine of any other layout: weights, fp32 master weights, Adam moments and step, LR schedule,
counters.

ZeRO-1/2 files store, per data-parallel rank and parameter group, a flat fp32 partition, the flat Adam
moments and `param_slice_mappings` {engine name: (start, numel)}. Concatenating a parameter's
fragments over the data-parallel ranks in rank order gives its whole (tensor-rank-local) flattened
tensor; merging the tensor ranks (trainer/checkpoint/layout.py) gives the canonical one. ZeRO-3 files
partition every parameter on its own (trainer/checkpoint/pipeline_files.py: read_zero3_tensors). Loading is the
reverse, through DeepSpeed's safe_set_full_fp32_param / safe_set_full_optimizer_state, so ZeRO
re-partitions it for the new data-parallel size itself.

Without ZeRO (fp32 at dp = 1, trainer/engine/ds_config.py) each model-parallel rank's mp_rank file holds
torch's AdamW state dict, its states keyed by position in the parameter groups, and the trainer's client
state names those positions (OPTIMIZER_PARAM_NAMES, written by trainer/engine/checkpoint.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from trainer.checkpoint.layout import merge_states, rule_for, shard
from trainer.checkpoint.pipeline_files import (Layout, canonical_name, checkpoint_offloads_optimizer, checkpoint_zero_stage,
                                               has_deepspeed_optimizer_files, is_pipeline_checkpoint, model_states_file,
                                               read_layout, read_model_weights, read_zero3_tensors, zero_file)
from trainer.engine import deepspeed_compat as ds_files
from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig

log = logging.getLogger("glm.checkpoint")

MOMENTS = ("exp_avg", "exp_avg_sq")
LAYOUT_FREE_OPTIMIZER = "layout_free_optimizer.pt"
"""Written by glm-ckpt convert: {"step": int, "fp32": {...}, "exp_avg": {...}, "exp_avg_sq": {...}}, canonical."""
OPTIMIZER_PARAM_NAMES = "optimizer_param_names"
"""Client state of a checkpoint without ZeRO: the pipeline names of the optimizer's parameters, per group."""
CLIENT_KEYS = ("step", "consumed_samples", "lr_scheduler", "global_steps", "global_samples", "skipped_steps")


@dataclass
class TrainingState:
    weights: dict[str, torch.Tensor]
    """Canonical fp32 weights (the optimizer's master copy when there is one)."""
    moments: Optional[dict[str, dict[str, torch.Tensor]]]
    """"exp_avg" / "exp_avg_sq" -> canonical state dict; None when the checkpoint has no optimizer state."""
    optimizer_step: int
    """Adam's step count (bias correction)."""
    client: dict
    """step, consumed_samples, lr_scheduler (state dict), global_steps, global_samples, skipped_steps."""


def _zero_fragments(tag_dir: Path, layout: Layout, mp_rank: int) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """One model-parallel rank's ZeRO files -> {engine name: {fp32, exp_avg, exp_avg_sq}} (full local
    tensors, shaped) and the Adam step; ({}, 0) when the optimizer never stepped."""
    if checkpoint_zero_stage(tag_dir) == 3:
        tensors, step = read_zero3_tensors(tag_dir, layout, mp_rank)
        return (tensors, step) if all("exp_avg" in t for t in tensors.values()) else ({}, 0)
    states = torch.load(model_states_file(tag_dir, mp_rank), map_location="cpu", weights_only=False)
    shapes = ds_files.param_shapes(states)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    step = 0
    for dp_rank in range(layout.dp):
        path = zero_file(tag_dir, dp_rank, mp_rank)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        for slices, flats in ds_files.zero12_fragments(torch.load(path, map_location="cpu", weights_only=False)):
            if not flats:
                return {}, 0
            step = int(flats.pop("step"))
            for name, (start, numel) in slices.items():
                for key, flat in flats.items():
                    pieces.setdefault(name, {}).setdefault(key, []).append(flat.narrow(0, start, numel))
    full = {}
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            full[name] = {key: torch.cat(parts).float().view(shape) for key, parts in pieces[name].items()}
    return full, step


def read_zero_optimizer(tag_dir: Path, config: ModelConfig) -> Optional[tuple[dict, dict, int]]:
    """ZeRO files of any stage and layout -> (canonical fp32 weights, canonical moments, step); None without
    them."""
    layout = read_layout(tag_dir)
    if not zero_file(tag_dir, 0, 0).is_file():
        return None
    per_key: dict[str, list[dict[str, torch.Tensor]]] = {key: [{} for _ in range(layout.tp)]
                                                         for key in ("fp32", *MOMENTS)}
    step = 0
    for mp_rank in range(layout.tp * layout.pp):
        fragments, step = _zero_fragments(tag_dir, layout, mp_rank)
        if not fragments:
            return None
        for name, tensors in fragments.items():
            for key, value in tensors.items():
                per_key[key][mp_rank % layout.tp][canonical_name(name, config)] = value
    merged = {key: merge_states(states, config) for key, states in per_key.items()}
    return merged.pop("fp32"), merged, step


def read_plain_optimizer(tag_dir: Path, config: ModelConfig) -> Optional[tuple[dict, int]]:
    """A checkpoint without ZeRO of any layout -> (canonical moments, step); None when it holds no Adam
    state this trainer can name (ZeRO files, another optimizer wrapper, or an optimizer that never stepped)."""
    layout = read_layout(tag_dir)
    per_key: dict[str, list[dict[str, torch.Tensor]]] = {key: [{} for _ in range(layout.tp)] for key in MOMENTS}
    step = 0
    for mp_rank in range(layout.tp * layout.pp):
        states = torch.load(model_states_file(tag_dir, mp_rank), map_location="cpu", weights_only=False)
        optimizer, names = states.get("optimizer"), states.get(OPTIMIZER_PARAM_NAMES)
        if not optimizer or not names or "state" not in optimizer:
            return None
        positions = [name for group in names for name in group]  # torch numbers them group after group
        for position, name in enumerate(positions):
            state = optimizer["state"].get(position, {})
            if not all(key in state for key in MOMENTS):
                return None
            step = int(state["step"])
            for key in MOMENTS:
                per_key[key][mp_rank % layout.tp][canonical_name(name, config)] = state[key].float()
    return {key: merge_states(states, config) for key, states in per_key.items()}, step


def read_training_state(tag_dir: Path, config: ModelConfig) -> TrainingState:
    """Everything a resume needs from a checkpoint of any layout (or one glm-ckpt convert wrote)."""
    layout_free = tag_dir / LAYOUT_FREE_OPTIMIZER
    if layout_free.is_file():
        saved = torch.load(layout_free, map_location="cpu", weights_only=True)
        weights, moments, step = saved["fp32"], {key: saved[key] for key in MOMENTS}, int(saved["step"])
    elif (zero := read_zero_optimizer(tag_dir, config)) is not None:
        weights, moments, step = zero  # the fp32 master copy: the model files need not be read
    else:
        weights = read_model_weights(tag_dir, config)
        plain = read_plain_optimizer(tag_dir, config)
        moments, step = plain if plain is not None else (None, 0)  # the weights are the fp32 master copy
    states = torch.load(model_states_file(tag_dir, 0), map_location="cpu", weights_only=False)
    client = {key: states.get(key) for key in CLIENT_KEYS}
    return TrainingState(weights, moments, step, client)


def load_into_engine(engine, topology, config: ModelConfig, state: TrainingState) -> None:
    """Set this rank's shard of every weight, master weight and Adam moment, the LR schedule and counters."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    optimizer = engine.optimizer
    zero = ds_files.is_zero_optimizer(optimizer)
    zero3 = engine.zero_optimization_stage() == 3
    if state.moments is not None and zero:
        ds_files.initialise_zero_moments(optimizer, state.optimizer_step, MOMENTS)
    for pipeline_name, param in engine.module.named_parameters():
        name = canonical_name(pipeline_name, config)
        rule = rule_for(name, config)
        value = shard(state.weights[name], rule, config, topology.tp, topology.tp_rank).to(param.device)
        if zero3:
            ds_files.set_zero3_weight(param, value)
        else:
            with torch.no_grad():
                param.copy_(value)
        if zero:
            safe_set_full_fp32_param(param, value)
        if state.moments is None:
            continue
        moments = {key: shard(state.moments[key][name], rule, config, topology.tp, topology.tp_rank).to(param.device)
                   for key in MOMENTS}
        if zero:
            for key, moment in moments.items():
                safe_set_full_optimizer_state(param, moment, key)
        else:
            optimizer.state[param] = {"step": torch.tensor(float(state.optimizer_step)), **moments}
    if not zero and hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()  # DeepSpeed's bf16/fp16 optimizers: master weights from the loaded ones
    client = state.client
    scheduler = engine.lr_scheduler
    if client["lr_scheduler"] is not None and scheduler is not None:
        scheduler.load_state_dict(client["lr_scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the next step's lr; DeepSpeed's own load restores it with the optimizer groups
    engine.global_steps = int(client["global_steps"] or 0)
    engine.global_samples = int(client["global_samples"] or 0)
    engine.skipped_steps = int(client["skipped_steps"] or 0)


def load_any_layout(engine, topology, config: ModelConfig, checkpoint_dir: Path, tag: str) -> Optional[tuple[int, int]]:
    """The engine's resume hook. When checkpoint_dir/tag was written by this very layout with the same
    optimizer files (ZeRO or not), return None (DeepSpeed loads it, RNG states included). Otherwise load
    it here and return (step, consumed_samples). RNG states are not carried across layouts (with
    dropout > 0 the dropout masks differ from the uninterrupted run)."""
    tag_dir = Path(checkpoint_dir) / tag
    layout = read_layout(tag_dir)
    same_layout = (layout == Layout(topology.tp, topology.pp, topology.dp)
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
    if same_layout and deepspeed_loads and not (tag_dir / LAYOUT_FREE_OPTIMIZER).is_file():
        return None
    state = read_training_state(tag_dir, config)
    if state.moments is None:
        log.warning(f"warning: {tag_dir} holds no Adam state this trainer can read on another layout; "
                    f"the weights are loaded and the Adam moments start from zero")
    load_into_engine(engine, topology, config, state)
    return int(state.client["step"] or 0), int(state.client["consumed_samples"] or 0)
