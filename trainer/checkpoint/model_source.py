"""Any model a user points at -> a GLMModel on this process: an export directory, a run's checkpoints/
directory (its `latest`), one global_stepN directory of any layout, a THUDM/GLM release directory, or a
transformers directory of model type glm or chatglm (trainer/checkpoint/hf.py).
Training checkpoints do not store the model config, so they need the run's config; the others carry it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from trainer.checkpoint import hf, thudm
from trainer.checkpoint.export import is_export, read_export
from trainer.checkpoint.layout import shard_state
from trainer.checkpoint.manifest import MANIFEST, verify
from trainer.checkpoint.pipeline_files import model_states_file, read_model_weights
from trainer.errors import CheckpointError, ConfigError
from trainer.model.config import ModelConfig
from trainer.parallel.mappings import group_rank, group_size


def training_tag_dir(path: Path) -> Optional[Path]:
    """The global_stepN directory `path` names (itself, or its checkpoints/latest); None if it is not one."""
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    return path if model_states_file(path, 0).is_file() and any(path.glob("layer_*-model_states.pt")) else None


def read_weights(path: Path, config: Optional[ModelConfig]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, canonical fp32 weights) of any supported source."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if hf.is_hf_directory(path):
        return hf.read_hf(path)
    if is_export(path):
        return read_export(path)
    if thudm.is_release(path):
        return thudm.read_release(path, config)
    tag_dir = training_tag_dir(path)
    if tag_dir is None:
        raise CheckpointError(f"{path} is neither an export, a THUDM/GLM release, a transformers glm/chatglm "
                              f"directory nor a training checkpoint (run_dir/checkpoints or a global_stepN directory)")
    problem = verify(tag_dir) if (tag_dir / MANIFEST).is_file() else None  # DeepSpeed's own saves have none
    if problem:
        raise CheckpointError(f"checkpoint {tag_dir} is corrupted ({problem}): point at an earlier global_stepN "
                              f"of the run, whose manifest checks")
    if config is None:
        raise ConfigError(f"{path} is a training checkpoint, which does not store the model shape: pass the "
                          f"run's --config (and its --set overrides)")
    return config, read_model_weights(tag_dir, config)


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], tp_group=None,
                device: Optional[torch.device] = None) -> torch.nn.Module:
    """A GLMModel in eval mode holding this tensor-parallel rank's shard of the canonical weights."""
    from trainer.model import GLMModel

    model = GLMModel(config, tp_group)
    model.load_state_dict(shard_state(weights, config, group_size(tp_group), group_rank(tp_group)))
    return model.to(device or "cpu").eval()
