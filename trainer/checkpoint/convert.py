"""glm-ckpt convert: a training checkpoint of any (tp, pp, dp) -> a checkpoint for another (tp, pp).

The output tag directory holds the layer files of the new tensor-parallel size, one
mp_rank_MM_model_states.pt per model-parallel rank of the new layout (client state, LR schedule,
counters, the new {tp_degree, pp_degree}), and the optimizer state in layout-free form
(layout_free_optimizer.pt), the run record (run.json, dp left open) and the source's data position. A run resumed from it (train.resume=true, any data-parallel size) loads it
through trainer.engine.resume.load_any_layout; a manifest and `latest` make it a checkpoint the
engine's loader accepts.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from trainer.checkpoint.ds_format import fresh_client
from trainer.checkpoint.manifest import fsync, write_atomic, write_manifest
from trainer.checkpoint.model_source import check_manifest, read_weights, training_tag_dir
from trainer.checkpoint.pipeline_files import model_states_file, write_layer_files
from trainer.checkpoint.run_record import DATA_POSITION, RUN_RECORD, checkpoint_model, read_run_record, run_record
from trainer.checkpoint.tags import LATEST, tag_for
from trainer.checkpoint.universal import LAYOUT_FREE_OPTIMIZER, MOMENTS, TrainingState, read_training_state
from trainer.errors import CheckpointError, ConfigError
from trainer.model.config import ModelConfig
from trainer.paths import staged_directory


def write_training_state(state: TrainingState, config: ModelConfig, tp: int, pp: int, tag_dir: Path,
                         source_tag: Optional[Path] = None) -> None:
    """A layout-free training state -> the files of a (tp, pp) checkpoint (see the module docstring), with its
    run record (the source checkpoint's tokenizer fingerprint) and the source's data position."""
    config.validate(tp)
    if pp < 1 or pp > config.num_layers:
        raise ConfigError(f"--to-pp {pp} must be between 1 and model.num_layers={config.num_layers}")
    write_layer_files(state.weights, config, tp, tag_dir)
    client = dict(state.client, module=None, optimizer=None, dp_world_size=1, mp_world_size=tp * pp,
                  checkpoint_parallel_dimensions={"tp_degree": tp, "pp_degree": pp})
    for mp_rank in range(tp * pp):
        torch.save(client, model_states_file(tag_dir, mp_rank))
    if state.moments is not None:
        torch.save({"step": state.optimizer_step, "fp32": state.weights, **{k: state.moments[k] for k in MOMENTS}},
                   tag_dir / LAYOUT_FREE_OPTIMIZER)
    fingerprint = (read_run_record(source_tag) or {}).get("tokenizer_sha256") if source_tag else None
    (tag_dir / RUN_RECORD).write_text(json.dumps(run_record(config, {"tp": tp, "pp": pp, "dp": None}, fingerprint)))
    if source_tag is not None and (source_tag / DATA_POSITION).is_file():
        shutil.copyfile(source_tag / DATA_POSITION, tag_dir / DATA_POSITION)
    write_manifest(tag_dir)


def source_state(source: Path, config: Optional[ModelConfig]) -> tuple[ModelConfig, TrainingState]:
    """Any source (model_source.read_weights) -> its training state; optimizer, schedule and counters
    only come from a training checkpoint, anything else starts at step 0 with a fresh optimizer."""
    tag_dir = training_tag_dir(source)
    if tag_dir is not None:
        check_manifest(tag_dir)
        config = checkpoint_model(tag_dir, config)
        return config, read_training_state(tag_dir, config)
    config, weights = read_weights(source, config)
    return config, TrainingState(weights, None, 0, fresh_client())


def convert_checkpoint(source: Path, config: Optional[ModelConfig], tp: int, pp: int, out_dir: Path) -> Path:
    """Write source as out_dir/<tag> for (tp, pp) and point out_dir/latest at it; returns the tag directory.
    The tag is the source's (global_stepN), or global_step0 for an export or a release. The tag directory is
    written beside its final name and renamed into place whole, then `latest` moves (the engine's order);
    an existing tag directory is never replaced."""
    config, state = source_state(source, config)
    source_tag = training_tag_dir(source)
    tag_dir = out_dir / (source_tag.name if source_tag is not None else tag_for(state.client["step"]))
    if tag_dir.exists():
        raise CheckpointError(f"{tag_dir} already exists: glm-ckpt convert never replaces a checkpoint; choose "
                              f"another --out or remove it")
    with staged_directory(tag_dir) as staging:
        write_training_state(state, config, tp, pp, staging, source_tag)
    fsync(out_dir)
    write_atomic(out_dir / LATEST, tag_dir.name)
    return tag_dir
