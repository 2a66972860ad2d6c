"""DeepSpeed's checkpoint files as files: their names, what their state dicts hold (the trainer's client state
among them), the ZeRO partition files and the copies of NVMe swap files. Reading and writing files only: no
live engine (loading into one is trainer/engine/resume.py). The tag directories around them, `latest` and
`global_stepN`, are trainer/checkpoint/tags.py.

This module sits below both trainer/checkpoint/ (which reads any layout's files through it) and
trainer/engine/ (which writes them through DeepSpeed's save_checkpoint). DeepSpeed documents save_checkpoint /
load_checkpoint, not what the files hold, so this is the files half of the DeepSpeed adapter: every file name
and state-dict key below is DeepSpeed's, written down once with what it means, and tests/test_deepspeed_compat.py
checks that the installed DeepSpeed still writes each. (The live-object half, engine and optimizer internals,
is trainer/engine/deepspeed_compat.py.)

Written against DeepSpeed 0.19.x (setup.cfg).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from trainer.errors import CheckpointError

# ---- The trainer's client state (beside DeepSpeed's own, in every mp_rank file) --------------------------

CLIENT_KEYS = ("step", "consumed_samples", "lr_scheduler", "global_steps", "global_samples", "skipped_steps")
"""What a resume reads from the model-states file: the trainer's step and consumed_samples (its client
state), DeepSpeed's LR scheduler state dict and engine counters."""
OPTIMIZER_PARAM_NAMES = "optimizer_param_names"
"""Client state of a checkpoint without ZeRO: the pipeline names of the optimizer's parameters, per group."""


def client_state(step: int, consumed_samples: int, optimizer_param_names: Optional[list[list[str]]]) -> dict:
    """The client_state the trainer hands save_checkpoint."""
    return {"step": step, "consumed_samples": consumed_samples, OPTIMIZER_PARAM_NAMES: optimizer_param_names}


def fresh_client() -> dict:
    """The client keys of a run at step 0: no schedule, zero counters (a fine-tuning start, a converted export)."""
    return {key: None if key == "lr_scheduler" else 0 for key in CLIENT_KEYS}


# ---- DeepSpeed's files in a tag directory ----------------------------------------------------------------

MODULE_STATE = "module"
"""mp_rank_XX_model_states.pt of the plain engine: the module's state dict (ZeRO-3: placeholders)."""


def model_states_file(tag_dir: Path, mp_rank: int) -> Path:
    return tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"


def zero3_model_states_file(tag_dir: Path, dp_rank: int, mp_rank: int) -> Path:
    """ZeRO-3's client-state file: one per data-parallel rank, no mp_rank_XX_model_states.pt."""
    return tag_dir / f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_model_states.pt"


def zero_file(tag_dir: Path, dp_rank: int, mp_rank: int, prefix: str = "") -> Path:
    """A ZeRO partition of the optimizer: `prefix` "" (ZeRO-1/2/3) or "bf16_" (the pipeline's bf16 optimizer)."""
    return tag_dir / f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def checkpoint_layout(states: dict) -> tuple[int, int, int]:
    """(tp, pp, dp) recorded in an mp_rank file. The pipeline engine writes checkpoint_parallel_dimensions; the
    plain engine only mp_world_size (its model-parallel ranks are the tensor ranks)."""
    dims = states.get("checkpoint_parallel_dimensions")
    if dims:
        tp, pp = int(dims.get("tp_degree", 1)), int(dims.get("pp_degree", 1))
    else:
        tp, pp = int(states.get("mp_world_size") or 1), 1
    return tp, pp, int(states.get("dp_world_size", 1))


def offloads_optimizer(states: dict) -> bool:
    """Whether the run that wrote a model-states file kept its Adam states on the host or NVMe (DeepSpeedCPUAdam,
    trainer/engine/optimizer.py): the `ds_config` DeepSpeed saves beside the client state is the dict the
    trainer gave it (trainer/engine/ds_config.py); files without one (glm-ckpt convert) offload nothing."""
    section = (states.get("ds_config") or {}).get("zero_optimization", {}).get("offload_optimizer") or {}
    return section.get("device", "none") in ("cpu", "nvme")


def zero_stage_of_file(state: dict) -> int:
    """The ZeRO stage that wrote an optim_states file (DeepSpeed's ZeroStageEnum value)."""
    return int(getattr(state["optimizer_state_dict"].get("zero_stage", 1), "value",
                       state["optimizer_state_dict"].get("zero_stage", 1)))


def zero12_fragments(state: dict) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """One ZeRO-1/2 partition file -> per parameter group ({name: (start, numel)} in the flat partition,
    {"fp32": flat master, "exp_avg": ..., "exp_avg_sq": ..., "step": ...}); an empty dict of flats for a group
    whose optimizer never stepped."""
    optimizer = state["optimizer_state_dict"]
    base = optimizer["base_optimizer_state"]["state"]
    groups = []
    for group, mapping in enumerate(optimizer["param_slice_mappings"]):
        slices = {name: (address.start, address.numel) for name, address in mapping.items()}
        adam = base.get(group, {})
        flats = {} if "exp_avg" not in adam else {"fp32": optimizer["single_partition_of_fp32_groups"][group],
                                                  "exp_avg": adam["exp_avg"], "exp_avg_sq": adam["exp_avg_sq"],
                                                  "step": adam["step"]}
        groups.append((slices, flats))
    return groups


def zero3_partitions(state: dict, offloaded: Path, numels: list[int]) -> list[dict[str, torch.Tensor]]:
    """One ZeRO-3 partition file -> per sub-group {"fp32": flat master partition, "exp_avg", "exp_avg_sq",
    "step"} (moments absent when the optimizer never stepped). ZeRO-3 partitions every parameter on its own:
    a parameter of n elements takes ceil(n / dp) elements of each rank's flat partition (zero padded), in
    parameter order (param_shapes of the mp_rank file).

    Under optimizer offload nvme the file holds an empty tensor for each sub-group kept in swap files, and the
    checkpoint a copy of those files: `offloaded` (offloaded_tensors_dir), one raw file per tensor named
    `{ds_id}.tensor.swp` after the saved tensor's `ds_id`, padded to the I/O alignment; `numels` are the
    sub-groups' real lengths."""
    optimizer = state["optimizer_state_dict"]
    base = optimizer["optimizer_state_dict"]["state"]
    result = []
    for group, flat in enumerate(optimizer["fp32_flat_groups"]):
        adam = base.get(group, {})
        tensors = {"fp32": flat, **{key: adam[key] for key in ("exp_avg", "exp_avg_sq") if key in adam}}
        for key, tensor in tensors.items():
            swap_file = offloaded / f"{getattr(tensor, 'ds_id', '')}.tensor.swp"
            if tensor.numel() == 0 and swap_file.is_file():
                if len(numels) != len(optimizer["fp32_flat_groups"]):
                    raise CheckpointError(f"{offloaded} holds NVMe-offloaded sub-groups of parameter groups split by "
                                          f"zero_optimization.sub_group_size: reading them is not supported")
                tensors[key] = _read_swap_file(swap_file, numels[group], tensor.dtype)
        result.append({**tensors, **({"step": adam["step"]} if "step" in adam else {})})
    return result


def offloaded_tensors_dir(tag_dir: Path, global_rank: int) -> Path:
    """Where save_checkpoint copies a rank's NVMe swap files (optimizer offload nvme)."""
    return tag_dir / "offloaded_tensors" / f"rank{global_rank:02d}"


def _read_swap_file(path: Path, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `numel` elements of a swap file (the rest is alignment padding), read once into a new tensor."""
    held = path.stat().st_size // torch.empty((), dtype=dtype).element_size()
    if held < numel:
        raise CheckpointError(f"{path} holds {held} elements, its sub-group {numel}: the checkpoint is damaged")
    return torch.from_file(str(path), shared=False, size=numel, dtype=dtype)


def param_shapes(states: dict) -> list[dict[str, torch.Size]]:
    """The mp_rank file's `param_shapes`: per optimizer group, {parameter name: shape} in flattening order."""
    return states["param_shapes"]
