"""Import THUDM/GLM release checkpoints (GLM-SPEC section 2): NAME/latest_checkpointed_iteration.txt and
NAME/<iteration>/mp_rank_XX_model_states.pt, one per model-parallel rank, each {"module": state dict}.

Their names map onto the canonical ones by three renames (everything under transformer.layers is already
GLMModel's): word_embeddings.weight -> embedding.word_embeddings.weight,
transformer.{block_,}position_embeddings.weight -> embedding.{block_,}position_embeddings.weight.
Their query_key_value holds each rank's [q_r; k_r; v_r], which is this trainer's rank-major layout, so
the model-parallel files merge with the same rules as ours (trainer/checkpoint/layout.py).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from trainer.checkpoint.layout import merge_states, shape_mismatches
from trainer.errors import CheckpointError, ConfigError
from trainer.model.config import ModelConfig

ITERATION_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
RENAMES = {"word_embeddings.weight": "embedding.word_embeddings.weight",
           "transformer.position_embeddings.weight": "embedding.position_embeddings.weight",
           "transformer.block_position_embeddings.weight": "embedding.block_position_embeddings.weight"}
HEAD_DIM = 64
"""Every released GLM (base, large, 10B) uses 64-wide heads. The head count is not in the tensor shapes, so it
is assumed only when no --config says otherwise (a GLM trained with THUDM's code at another width)."""


def is_release(path: Path) -> bool:
    return (path / ITERATION_FILE).is_file()


def rank_files(path: Path) -> list[Path]:
    """The mp_rank_XX files of the release's latest iteration, in rank order."""
    iteration_dir = path / (path / ITERATION_FILE).read_text().strip()
    files = sorted((p for p in iteration_dir.glob("mp_rank_*_model_states.pt") if RANK_FILE.match(p.name)),
                   key=lambda p: int(RANK_FILE.match(p.name).group(1)))
    if not files:
        raise CheckpointError(f"{iteration_dir} holds no mp_rank_XX_model_states.pt files")
    return files


def infer_config(canonical_shapes: dict[str, torch.Size], model_parallel: int) -> ModelConfig:
    """The GLM shape from the tensors of rank 0 (heads of width 64, GeLU, pre-LN, learned 2D positions)."""
    vocab_per_rank, h = canonical_shapes["embedding.word_embeddings.weight"]
    num_layers = len({name.split(".")[2] for name in canonical_shapes if name.startswith("transformer.layers.")})
    return ModelConfig(num_layers=num_layers, hidden_size=h, num_attention_heads=h // HEAD_DIM,
                       vocab_size=vocab_per_rank * model_parallel,
                       max_sequence_length=canonical_shapes["embedding.position_embeddings.weight"][0],
                       ffn_hidden_size=canonical_shapes["transformer.layers.0.mlp.dense_h_to_4h.weight"][0] * model_parallel)


def read_release(path: Path, config: Optional[ModelConfig] = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A THUDM/GLM release directory -> (ModelConfig, canonical fp32 weights). Without a config the shape
    is inferred (infer_config); the vocabulary is then the padded one of the release."""
    per_rank = []
    for file in rank_files(path):
        module = torch.load(file, map_location="cpu", weights_only=False).get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{file} has no 'module' state dict: not a THUDM/GLM model checkpoint")
        per_rank.append({RENAMES.get(name, name): value.float() for name, value in module.items()})
    if "embedding.word_embeddings.weight" not in per_rank[0]:
        raise CheckpointError(f"{path} has no word_embeddings.weight: not a THUDM/GLM model checkpoint")
    inferred = infer_config({name: value.shape for name, value in per_rank[0].items()}, len(per_rank))
    if config is not None:
        check_release_config(path, config, inferred)
    config = config or inferred
    config.validate()
    problems = shape_mismatches({name: value.shape for name, value in per_rank[0].items()}, config, len(per_rank))
    if problems:
        raise ConfigError(f"--config does not match the release {path} ({'; '.join(problems[:3])}"
                          f"{f'; {len(problems) - 3} more' if len(problems) > 3 else ''}): import without --config "
                          f"(the shape is read from the tensors) or fix the config")
    return config, merge_states(per_rank, config)


def check_release_config(path: Path, config: ModelConfig, inferred: ModelConfig) -> None:
    """What the tensors cannot show but THUDM/GLM's code always builds: pre-LN. The head count cannot be seen
    either, but THUDM's code takes any: the config's word is taken for it."""
    if config.norm != inferred.norm:
        raise ConfigError(f"--config does not match the release {path}: THUDM/GLM's code builds model.norm=pre_ln, "
                          f"the config says norm={config.norm}")
