"""Any model a user points at -> a GLMModel on this process: an export directory, a run directory or its
checkpoints/ (their `latest`), one global_stepN directory of any layout, a THUDM/GLM release directory, or a
transformers directory of model type glm, glm4_moe or chatglm (trainer/checkpoint/hf.py). Each carries its model config
(a training checkpoint in its run.json, trainer/checkpoint/run_record.py); a config the user passes must
agree with it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from trainer.checkpoint import hf, thudm
from trainer.checkpoint.export import TOKENIZER, is_export, read_export
from trainer.checkpoint.layout import shard_state
from trainer.checkpoint.manifest import MANIFEST, verify
from trainer.checkpoint.pipeline_files import model_states_file, read_model_weights
from trainer.checkpoint.run_record import check_shape, checkpoint_model, read_run_record, recorded_model, run_tokenizer
from trainer.checkpoint.tags import LATEST, resume_tag
from trainer.errors import CheckpointError
from trainer.model import GLMModel
from trainer.model.config import ModelConfig
from trainer.parallel.mappings import group_rank, group_size


def training_tag_dir(path: Path) -> Optional[Path]:
    """The global_stepN directory `path` names (itself, a checkpoints/ directory's latest, or a run
    directory's checkpoints/latest); None if it is not one."""
    if (path / "checkpoints" / LATEST).is_file():
        path = path / "checkpoints"
    if (tag := resume_tag(path)) is not None:
        path = path / tag
    return path if model_states_file(path, 0).is_file() else None


def read_weights(path: Path, config: Optional[ModelConfig]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, canonical fp32 weights) of any supported source."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if hf.is_hf_directory(path) or is_export(path):
        carried, weights = hf.read_hf(path) if hf.is_hf_directory(path) else read_export(path)
        return check_given(path, carried, config), weights
    if thudm.is_release(path):
        return thudm.read_release(path, config)
    tag_dir = training_tag_dir(path)
    if tag_dir is None:
        raise CheckpointError(f"{path} is neither an export, a THUDM/GLM release, a transformers glm/chatglm "
                              f"directory nor a training checkpoint (run_dir/checkpoints or a global_stepN directory)")
    check_manifest(tag_dir)
    config = checkpoint_model(tag_dir, config)
    return config, read_model_weights(tag_dir, config)


def check_manifest(tag_dir: Path) -> None:
    """Refuse a training checkpoint whose files do not match its manifest (DeepSpeed's own saves have none)."""
    problem = verify(tag_dir) if (tag_dir / MANIFEST).is_file() else None
    if problem:
        raise CheckpointError(f"checkpoint {tag_dir} is corrupted ({problem}): point at an earlier global_stepN "
                              f"of the run, whose manifest checks")


def carries_config(path: Path) -> bool:
    """Whether a source holds its own model config (all but THUDM releases and training checkpoints saved before
    run.json recorded it)."""
    if hf.is_hf_directory(path) or is_export(path):
        return True
    tag_dir = training_tag_dir(path) if path.is_dir() else None
    return tag_dir is not None and recorded_model(read_run_record(tag_dir)) is not None


def check_given(path: Path, carried: ModelConfig, given: Optional[ModelConfig]) -> ModelConfig:
    """The config a source carries; a given one (the user's --config) must describe the same shape."""
    check_shape(given, carried.shape(), str(path), "pass none, the source carries its own")
    return carried


def source_tokenizer(path: Path) -> Optional[Path]:
    """The tokenizer a source ships: an export's or a transformers directory's tokenizer.json, or a training
    checkpoint's run's (checked against the checkpoint's fingerprint); None for a release or a run dir without
    one."""
    if (path / TOKENIZER).is_file() and (is_export(path) or hf.is_hf_directory(path)):
        return path / TOKENIZER
    tag_dir = training_tag_dir(path) if path.is_dir() else None
    return run_tokenizer(tag_dir) if tag_dir is not None else None


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], tp_group=None,
                device: Optional[torch.device] = None, ep_group=None) -> torch.nn.Module:
    """A GLMModel in eval mode holding this tensor-parallel rank's shard of the canonical weights (and, with an
    ep_group, this expert-parallel rank's contiguous block of the experts of its expert_parallel parameters)."""
    model = GLMModel(config, tp_group, ep_group=ep_group)
    state = shard_state(weights, config, group_size(tp_group), group_rank(tp_group))
    ep, ep_rank = group_size(ep_group), group_rank(ep_group)
    for name, param in model.named_parameters():
        if getattr(param, "expert_parallel", False):
            state[name] = state[name].chunk(ep, dim=0)[ep_rank]  # [E / ep, ...]
    model.load_state_dict(state)
    return model.to(device or "cpu").eval()
