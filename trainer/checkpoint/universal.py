"""The layout-free training state, read from a DeepSpeed checkpoint of any (tp, pp, dp, ep): weights, fp32 master
weights, Adam moments and step, LR schedule, counters (the routed experts of an ep > 1 checkpoint from its
expert files: trainer/checkpoint/expert_files.py). Loading it into a live engine of any other layout is
trainer/engine/resume.py; what DeepSpeed's files hold is trainer/checkpoint/ds_format.py.

ZeRO-1/2 files store, per data-parallel rank and parameter group, a flat fp32 partition, the flat Adam
moments and `param_slice_mappings` {engine name: (start, numel)}. Concatenating a parameter's
fragments over the data-parallel ranks in rank order gives its whole (tensor-rank-local) flattened
tensor; merging the tensor ranks (trainer/checkpoint/layout.py) gives the canonical one. ZeRO-3 files
partition every parameter on its own (trainer/checkpoint/pipeline_files.py: read_zero3_tensors).

Without ZeRO (fp32 at dp = 1, trainer/engine/ds_config.py) each model-parallel rank's mp_rank file holds
torch's AdamW state dict, its states keyed by position in the parameter groups, and the trainer's client
state names those positions (ds_format.OPTIMIZER_PARAM_NAMES, written by trainer/engine/checkpoint.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from trainer.checkpoint import ds_format
from trainer.checkpoint.expert_files import read_experts
from trainer.checkpoint.layout import merge_states
from trainer.checkpoint.pipeline_files import (Layout, canonical_name, checkpoint_zero_stage, model_states_file,
                                               read_layout, read_model_weights, read_zero3_tensors, zero_file)
from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig

MOMENTS = ("exp_avg", "exp_avg_sq")
LAYOUT_FREE_OPTIMIZER = "layout_free_optimizer.pt"
"""Written by glm-ckpt convert: {"step": int, "fp32": {...}, "exp_avg": {...}, "exp_avg_sq": {...}}, canonical."""


@dataclass
class TrainingState:
    weights: dict[str, torch.Tensor]
    """Canonical fp32 weights (the optimizer's master copy when there is one)."""
    moments: Optional[dict[str, dict[str, torch.Tensor]]]
    """"exp_avg" / "exp_avg_sq" -> canonical state dict; None when the checkpoint has no optimizer state."""
    optimizer_step: int
    """Adam's step count (bias correction)."""
    client: dict
    """ds_format.CLIENT_KEYS: step, consumed_samples, lr_scheduler (state dict), global_steps, global_samples,
    skipped_steps."""


def _zero_fragments(tag_dir: Path, layout: Layout, mp_rank: int, skip: Callable[[str], bool],
                    prefix: str = "") -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """One model-parallel rank's ZeRO files -> {engine name: {fp32, exp_avg, exp_avg_sq}} (full local
    tensors, shaped) and the Adam step; ({}, 0) when the optimizer never stepped. Names for which `skip` holds are
    left out (ZeRO-1/2 partitions the routed experts of an ep > 1 run over their expert-data group, not over the
    data-parallel ranks: they are read from the expert files)."""
    if checkpoint_zero_stage(tag_dir) == 3:
        tensors, step = read_zero3_tensors(tag_dir, layout, mp_rank)
        return (tensors, step) if all("exp_avg" in t for t in tensors.values()) else ({}, 0)
    states = torch.load(model_states_file(tag_dir, mp_rank), map_location="cpu", weights_only=False)
    shapes = ds_format.param_shapes(states)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    step = 0
    for dp_rank in range(layout.dp):
        path = zero_file(tag_dir, dp_rank, mp_rank, prefix=prefix)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        for slices, flats in ds_format.zero12_fragments(torch.load(path, map_location="cpu", weights_only=False)):
            if not flats:
                return {}, 0
            step = int(flats.pop("step"))
            for name, (start, numel) in slices.items():
                if skip(name):
                    continue
                for key, flat in flats.items():
                    pieces.setdefault(name, {}).setdefault(key, []).append(flat.narrow(0, start, numel))
    full = {}
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            if skip(name):
                continue
            full[name] = {key: torch.cat(parts).float().view(shape) for key, parts in pieces[name].items()}
    return full, step


def read_zero_optimizer(tag_dir: Path, config: ModelConfig) -> Optional[tuple[dict, dict, int]]:
    """ZeRO files of any stage and layout -> (canonical fp32 weights, canonical moments, step); None without
    them. At ep > 1 the routed experts come from the expert files, and a bf16 run's ZeRO-1/2 files are named
    `bf16_zero_pp_rank_*` (DeepSpeed names them so whenever bf16 is on; at ep > 1 they are ZeRO's own optimizer's,
    never the bf16 optimizer's: trainer/engine/ds_config.py, grad_accum_dtype)."""
    layout = read_layout(tag_dir)
    experts = read_experts(tag_dir, config, layout.tp, layout.pp, canonical_name)
    prefix = "bf16_" if experts is not None and zero_file(tag_dir, 0, 0, prefix="bf16_").is_file() else ""
    if not zero_file(tag_dir, 0, 0, prefix=prefix).is_file():
        return None
    expert_names = set(experts[0]["fp32"]) if experts is not None else set()
    per_key: dict[str, list[dict[str, torch.Tensor]]] = {key: [{} for _ in range(layout.tp)]
                                                         for key in ("fp32", *MOMENTS)}
    step = 0
    for mp_rank in range(layout.tp * layout.pp):
        fragments, step = _zero_fragments(tag_dir, layout, mp_rank,
                                          skip=lambda name: canonical_name(name, config) in expert_names,
                                          prefix=prefix)
        if not fragments:
            return None
        for name, tensors in fragments.items():
            for key, value in tensors.items():
                per_key[key][mp_rank % layout.tp][canonical_name(name, config)] = value
    merged = {key: merge_states(states, config) for key, states in per_key.items()}
    if experts is not None:
        if not all(key in experts[0] for key in MOMENTS):
            return None
        for key, states in merged.items():
            states.update(experts[0][key])
    return merged.pop("fp32"), merged, step


def read_plain_optimizer(tag_dir: Path, config: ModelConfig) -> Optional[tuple[dict, int]]:
    """A checkpoint without ZeRO of any layout -> (canonical moments, step); None when it holds no Adam
    state this trainer can name (ZeRO files, another optimizer wrapper, or an optimizer that never stepped)."""
    layout = read_layout(tag_dir)
    per_key: dict[str, list[dict[str, torch.Tensor]]] = {key: [{} for _ in range(layout.tp)] for key in MOMENTS}
    step = 0
    for mp_rank in range(layout.tp * layout.pp):
        states = torch.load(model_states_file(tag_dir, mp_rank), map_location="cpu", weights_only=False)
        optimizer, names = states.get("optimizer"), states.get(ds_format.OPTIMIZER_PARAM_NAMES)
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
    moments = {key: merge_states(states, config) for key, states in per_key.items()}
    experts = read_experts(tag_dir, config, layout.tp, layout.pp, canonical_name)
    if experts is not None:  # data rank 0's optimizer holds its own block of experts only
        if not all(key in experts[0] for key in MOMENTS):
            return None
        for key in MOMENTS:
            moments[key].update(experts[0][key])
    return moments, step


def read_training_state(tag_dir: Path, config: ModelConfig) -> TrainingState:
    """Everything a resume needs from a checkpoint of any layout (or one glm-ckpt convert wrote)."""
    layout_free = tag_dir / LAYOUT_FREE_OPTIMIZER
    if layout_free.is_file():
        saved = torch.load(layout_free, map_location="cpu", weights_only=True)
        weights, moments, step = saved["fp32"], {key: saved[key] for key in MOMENTS}, int(saved["step"])
    elif (zero := read_zero_optimizer(tag_dir, config)) is not None:
        weights, moments, step = zero  # the fp32 master copy of the parameters
        if config.moe_num_experts:  # the routers' expert_bias buffers: in the model files only
            weights = {**read_model_weights(tag_dir, config), **weights}
    else:
        weights = read_model_weights(tag_dir, config)
        plain = read_plain_optimizer(tag_dir, config)
        moments, step = plain if plain is not None else (None, 0)  # the weights are the fp32 master copy
    states = torch.load(model_states_file(tag_dir, 0), map_location="cpu", weights_only=False)
    client = {key: states.get(key) for key in ds_format.CLIENT_KEYS}
    return TrainingState(weights, moments, step, client)
