"""Fine-tuning: start a run from trained weights with a fresh optimizer and LR schedule, and freeze parts.

Initialisation (finetune.init_from, skipped on train.resume): any source trainer.checkpoint.model_source
reads (an export, a run's checkpoints/ or global_stepN directory of any layout, a THUDM/GLM release)
gives canonical weights, which are sharded onto this rank's parameters and, under ZeRO, its fp32 master
partition. Adam's moments start at zero, the LR schedule at step 0, the data at sample 0.

Freezing (finetune.freeze_embeddings / freeze_blocks) is done with two public mechanisms, the same on
both engines and every ZeRO stage, before the engine is built (trainer/engine/build.py):
  - a gradient hook replaces a frozen parameter's gradient by zeros, so the clipping norm and Adam see
    only the trainable parameters;
  - the frozen parameters form their own optimizer group of lr 0 and no weight decay
    (trainer/engine/optimizer.py), so AdamW's update, p <- p (1 - lr wd) - lr m / (sqrt(v) + eps), is
    exactly p, in the weights and in ZeRO's fp32 master copy.
Frozen weights therefore stay bit-identical. Their gradients are still computed (then zeroed).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from trainer.checkpoint.ds_format import fresh_client
from trainer.checkpoint.model_source import carries_config, read_weights
from trainer.checkpoint.pipeline_files import canonical_name
from trainer.checkpoint.universal import TrainingState
from trainer.config import Config, FinetuneConfig
from trainer.engine.resume import load_into_engine
from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig

log = logging.getLogger("glm.finetune")
ARCHITECTURE = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length", "ffn_size",
                "position_embedding", "norm", "mlp")
"""The ModelConfig values a source must share with the run: they fix the weights' shapes and meaning."""
BLOCK = re.compile(r"^transformer\.layers\.(\d+)\.")


def is_frozen(name: str, finetune: FinetuneConfig) -> bool:
    """Whether the parameter of canonical `name` is kept fixed."""
    if name.startswith("embedding."):
        return finetune.freeze_embeddings
    block = BLOCK.match(name)
    return block is not None and int(block.group(1)) < finetune.freeze_blocks


def check_compatible(source: ModelConfig, model: ModelConfig, path: Path) -> None:
    """The source's architecture must be the run's (model section of the config)."""
    different = [f"{key}: source {getattr(source, key)!r}, run {getattr(model, key)!r}"
                 for key in ARCHITECTURE if getattr(source, key) != getattr(model, key)]
    if different:
        raise CheckpointError(f"finetune.init_from={path} has another architecture than the run ({'; '.join(different)}): "
                              f"set the model section (and the tokenizer's vocabulary) to match the source")


def initialise(engine, topology, config: Config) -> None:
    """Load finetune.init_from's weights into the engine; optimizer and schedule stay fresh."""
    path = Path(config.finetune.init_from)
    source, weights = read_weights(path, None if carries_config(path) else config.model)  # compared just below
    check_compatible(source, config.model, path)
    names = {canonical_name(name, config.model) for name, _ in engine.module.named_parameters()}
    missing = sorted(names - set(weights))
    if missing:
        raise CheckpointError(f"finetune.init_from={path} lacks {len(missing)} weight(s) of the model, e.g. "
                              f"{missing[0]}: it is not a checkpoint of this architecture")
    load_into_engine(engine, topology, config.model, TrainingState(weights, None, 0, fresh_client()))
    log.info("finetune: weights from %s (optimizer, LR schedule and data position start fresh)", path)


def freeze(module: torch.nn.Module, config: Config) -> list[torch.nn.Parameter]:
    """The parameters finetune freezes, their gradients zeroed by a hook; build_optimizer puts them in a
    group of lr 0 (module docstring)."""
    finetune = config.finetune
    frozen = [param for name, param in module.named_parameters() if is_frozen(canonical_name(name, config.model), finetune)]
    for param in frozen:
        param.register_hook(torch.zeros_like)
    if frozen:
        log.info("finetune: %d parameter tensors frozen (%s)", len(frozen),
                 ", ".join(filter(None, ["embeddings" if finetune.freeze_embeddings else "",
                                         f"blocks 1..{finetune.freeze_blocks}" if finetune.freeze_blocks else ""])))
    return frozen


def start(engine, config: Config, topology, resumed: bool) -> None:
    """The trainer's fine-tuning hook, called once the engine is built: load finetune.init_from unless the
    run resumed from its own checkpoint."""
    if config.finetune.init_from and not resumed:
        initialise(engine, topology, config)
