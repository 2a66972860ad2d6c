"""DeepSpeed pipeline checkpoints (trainer/engine/checkpoint.py) read and written at any layout.

A tag directory global_stepN/ holds, as DeepSpeed 0.19.8 writes them:
    layer_XX-model_YY-model_states.pt   the state dict of global layer XX on tensor rank YY
                                        (XX: 0 embedding, 1..N blocks, N+1 final norm, N+2 the untied
                                        output layer; a tied one has no file of its own). Written once
                                        per (XX, YY).
    mp_rank_MM_model_states.pt          per model-parallel rank MM = pp_rank * tp + tp_rank: client state
                                        (step, consumed_samples), LR scheduler, counters, param_shapes,
                                        checkpoint_parallel_dimensions {pp_degree, tp_degree}, dp_world_size
    zero_pp_rank_D_mp_rank_MM_optim_states.pt   ZeRO-1 optimizer partition of data-parallel rank D
    bf16_zero_pp_rank_D_mp_rank_MM_optim_states.pt   the same from DeepSpeed's bf16 optimizer (bf16 pipelines)
Layer indices are global, so a pipeline split changes no layer file; the tensor-parallel size changes
every split parameter. Pipeline parameter names are `tied_modules.embed.<p>` (the embedding, on the
first and last stage) and `<XX>.<p>` (a block or the final norm).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.checkpoint.layout import merge_states, shard_state
from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig
from trainer.model.output import OUTPUT_WEIGHT

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
TIED_PREFIX = "tied_modules.embed."


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int


def layer_file(tag_dir: Path, layer: int, tp_rank: int) -> Path:
    return tag_dir / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def model_states_file(tag_dir: Path, mp_rank: int) -> Path:
    return tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"


def zero_file(tag_dir: Path, dp_rank: int, mp_rank: int) -> Path:
    return tag_dir / f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def has_deepspeed_optimizer_files(tag_dir: Path) -> bool:
    """Whether DeepSpeed wrote partitioned optimizer files: ZeRO-1's, or (bf16 pipelines) its bf16 optimizer's
    `bf16_zero_pp_rank_D_mp_rank_MM_optim_states.pt`."""
    return zero_file(tag_dir, 0, 0).is_file() or (tag_dir / f"bf16_{zero_file(tag_dir, 0, 0).name}").is_file()


def canonical_prefix(layer: int, config: ModelConfig) -> str:
    """The canonical name prefix of global layer `layer`."""
    if layer == 0:
        return "embedding."
    if layer <= config.num_layers:
        return f"transformer.layers.{layer - 1}."
    if layer == config.num_layers + 1:
        return "transformer.final_layernorm."
    if layer == config.num_layers + 2 and not config.tie_word_embeddings:
        return OUTPUT_WEIGHT.split(".")[0] + "."
    raise CheckpointError(f"layer {layer} does not exist in a model of {config.num_layers} blocks: "
                          f"check model.num_layers against the checkpoint")


def layers_with_files(config: ModelConfig) -> range:
    """The global layers that have layer files: all but a tied output layer."""
    return range(config.num_layers + (2 if config.tie_word_embeddings else 3))


def canonical_name(engine_name: str, config: ModelConfig) -> str:
    """A parameter name of either engine's module -> the canonical name: a PipelineModule's is translated,
    the plain engine's GLMTrainModel (trainer/engine/plain.py) already uses the canonical names."""
    if engine_name.startswith(TIED_PREFIX):
        return "embedding." + engine_name[len(TIED_PREFIX):]
    layer, rest = engine_name.split(".", 1)
    if not layer.isdigit():
        return engine_name
    return canonical_prefix(int(layer), config) + rest


def read_layout(tag_dir: Path) -> Layout:
    """The (tp, pp, dp) a DeepSpeed checkpoint was written with."""
    path = model_states_file(tag_dir, 0)
    if not path.is_file():
        raise CheckpointError(f"{tag_dir} has no {path.name}: it is not a checkpoint of this trainer "
                              f"(pass a run's checkpoints/global_stepN directory)")
    states = torch.load(path, map_location="cpu", weights_only=False)
    dims = states.get("checkpoint_parallel_dimensions") or {}
    return Layout(tp=int(dims.get("tp_degree", 1)), pp=int(dims.get("pp_degree", 1)),
                  dp=int(states.get("dp_world_size", 1)))


def read_model_weights(tag_dir: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The layer files of any (tp, pp) -> the canonical state dict (fp32)."""
    tp = read_layout(tag_dir).tp
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for layer in layers_with_files(config):
        for tp_rank in range(tp):
            path = layer_file(tag_dir, layer, tp_rank)
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: the checkpoint is incomplete, or model.num_layers="
                                      f"{config.num_layers} does not match it")
            prefix = canonical_prefix(layer, config)
            for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
                per_rank[tp_rank][prefix + key] = value.float()
    return merge_states(per_rank, config)


def write_layer_files(canonical: dict[str, torch.Tensor], config: ModelConfig, tp: int, tag_dir: Path) -> None:
    """The canonical state dict -> layer_XX-model_YY-model_states.pt files for tensor-parallel size tp."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    for tp_rank in range(tp):
        shards = shard_state(canonical, config, tp, tp_rank)
        for layer in layers_with_files(config):
            prefix = canonical_prefix(layer, config)
            state = {name[len(prefix):]: value for name, value in shards.items() if name.startswith(prefix)}
            torch.save(state, layer_file(tag_dir, layer, tp_rank))
