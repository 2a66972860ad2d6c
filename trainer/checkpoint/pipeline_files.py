"""DeepSpeed checkpoints of either engine (trainer/engine/checkpoint.py) read at any layout, and pipeline
checkpoints written at any layout. What the files hold is DeepSpeed's business: their names and the parsing of
their contents live in trainer/checkpoint/ds_format.py.

A pipeline engine's tag directory global_stepN/ holds, as DeepSpeed 0.19.8 writes them:
    layer_XX-model_YY-model_states.pt   the state dict of global layer XX on tensor rank YY
                                        (XX: 0 embedding, 1..N blocks, N+1 final norm, N+2 the untied
                                        output layer; a tied one has no file of its own; with an MTP
                                        layer N+3 the MTP layer and N+4 the output layer, N+2 being the
                                        tied embedding of token t+1). Written once per (XX, YY).
    mp_rank_MM_model_states.pt          per model-parallel rank MM = pp_rank * tp + tp_rank: client state
                                        (step, consumed_samples), LR scheduler, counters, param_shapes,
                                        checkpoint_parallel_dimensions {pp_degree, tp_degree}, dp_world_size
    zero_pp_rank_D_mp_rank_MM_optim_states.pt   ZeRO-1 optimizer partition of data-parallel rank D
    bf16_zero_pp_rank_D_mp_rank_MM_optim_states.pt   the same from DeepSpeed's bf16 optimizer (bf16 pipelines)
Layer indices are global, so a pipeline split changes no layer file; the tensor-parallel size changes
every split parameter. Pipeline parameter names are `tied_modules.embed.<p>` (the embedding, on the
first and last stage) and `<XX>.<p>` (a block or the final norm).

The plain engine (parallel.pp = 1, trainer/engine/plain.py) writes no layer files: mp_rank_TT_model_states.pt
(TT = tensor rank) holds the module's state dict under its canonical names, beside the same client state and
ZeRO-1/2 partition files. Under ZeRO-3 the weights exist only as fp32 partitions: each data-parallel rank D
writes zero_pp_rank_D_mp_rank_TT_model_states.pt (client state, param_shapes, placeholders for the weights)
and zero_pp_rank_D_mp_rank_TT_optim_states.pt (its partition of every weight and Adam moment).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from trainer.checkpoint import ds_format
from trainer.checkpoint.expert_files import read_experts
from trainer.checkpoint.layout import merge_states, shard_state
from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig
from trainer.model.glm import glm_pieces
from trainer.parallel.mesh import Layout

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
TIED_PREFIX = "tied_modules.embed."


def layer_file(tag_dir: Path, layer: int, tp_rank: int) -> Path:
    return tag_dir / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def model_states_file(tag_dir: Path, mp_rank: int) -> Path:
    """The client-state file of model-parallel rank mp_rank (data-parallel rank 0's under ZeRO-3)."""
    path = ds_format.model_states_file(tag_dir, mp_rank)
    zero3 = ds_format.zero3_model_states_file(tag_dir, 0, mp_rank)
    return zero3 if not path.is_file() and zero3.is_file() else path


zero_file = ds_format.zero_file


def has_deepspeed_optimizer_files(tag_dir: Path) -> bool:
    """Whether DeepSpeed wrote partitioned optimizer files: ZeRO's, or (bf16 without ZeRO) its bf16 optimizer's
    `bf16_zero_pp_rank_D_mp_rank_MM_optim_states.pt`."""
    return zero_file(tag_dir, 0, 0).is_file() or zero_file(tag_dir, 0, 0, prefix="bf16_").is_file()


def checkpoint_zero_stage(tag_dir: Path) -> int:
    """The ZeRO stage that wrote the checkpoint (0 without ZeRO files; 1 for the bf16 optimizer's files, which
    DeepSpeed writes for bf16 under ZeRO-1)."""
    path = zero_file(tag_dir, 0, 0)
    if not path.is_file():
        return 1 if zero_file(tag_dir, 0, 0, prefix="bf16_").is_file() else 0
    if ds_format.zero3_model_states_file(tag_dir, 0, 0).is_file():
        return 3  # only ZeRO-3 writes per-data-rank model states: no need to load a partition
    return ds_format.zero_stage_of_file(torch.load(path, map_location="cpu", weights_only=False))


def checkpoint_offloads_optimizer(tag_dir: Path) -> bool:
    """Whether the checkpoint's optimizer ran on the host (optim.offload_optimizer: DeepSpeedCPUAdam, whose
    parameter groups carry other keys than torch's AdamW)."""
    # mmap: only the saved config is read, not the module's weights the file also holds (ZeRO 0-2)
    states = torch.load(model_states_file(tag_dir, 0), map_location="cpu", weights_only=False, mmap=True)
    return ds_format.offloads_optimizer(states)


def is_pipeline_checkpoint(tag_dir: Path) -> bool:
    """Layer files (the pipeline engine, or glm-ckpt convert) rather than the plain engine's module states."""
    return layer_file(tag_dir, 0, 0).is_file()


def canonical_prefix(layer: int, config: ModelConfig) -> str:
    """The canonical name prefix of global layer `layer` (the name of its piece: trainer/model/glm.py)."""
    pieces = glm_pieces(config)
    if not 0 <= layer < len(pieces):
        raise CheckpointError(f"layer {layer} does not exist in a model of {config.num_layers} blocks and "
                              f"{config.mtp_layers} MTP layers: check model.num_layers and model.mtp_layers against "
                              f"the checkpoint")
    return pieces[layer].name + "."


def layers_with_files(config: ModelConfig) -> list[int]:
    """The global layers that have layer files: every piece DeepSpeed holds as a module, which is all but the
    tied pieces with a forward_fn (the tied output head, an MTP model's embedding of token t+1: their weight is
    the embedding's, layer 0's)."""
    return [layer for layer, piece in enumerate(glm_pieces(config)) if piece.tie is None or piece.forward_fn is None]


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
    return Layout(*ds_format.checkpoint_layout(torch.load(path, map_location="cpu", weights_only=False)))


def read_zero3_tensors(tag_dir: Path, layout: Layout, tp_rank: int) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """One tensor rank's ZeRO-3 files -> {canonical name: {"fp32": weight, "exp_avg", "exp_avg_sq"}} (this
    tensor rank's whole tensors; no moments when the optimizer never stepped) and the Adam step. ZeRO-3 cuts
    every parameter of n elements into dp pieces of ceil(n / dp) (the last zero padded), in param_shapes order."""
    shapes = ds_format.param_shapes(torch.load(model_states_file(tag_dir, tp_rank), map_location="cpu",
                                              weights_only=False))
    # Each sub-group's elements on one rank (optimizer offload nvme keeps some in swap files, padded).
    numels = [sum(-(-math.prod(shape) // layout.dp) for shape in group.values()) for group in shapes]
    flats, step = [], 0
    for dp_rank in range(layout.dp):
        path = zero_file(tag_dir, dp_rank, tp_rank)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        offloaded = ds_format.offloaded_tensors_dir(tag_dir, layout.rank_at(dp=dp_rank, tp=tp_rank))  # ZeRO-3: pp = 1
        groups = ds_format.zero3_partitions(torch.load(path, map_location="cpu", weights_only=False), offloaded, numels)
        keys = [key for key in ("fp32", "exp_avg", "exp_avg_sq") if all(key in group for group in groups)]
        flats.append({key: torch.cat([group[key] for group in groups]) for key in keys})
        step = int(groups[0].get("step", 0))
    tensors, offset = {}, 0
    for name, shape in ((name, shape) for group in shapes for name, shape in group.items()):
        numel = math.prod(shape)
        piece = -(-numel // layout.dp)
        tensors[name] = {key: torch.cat([flat[key].narrow(0, offset, piece) for flat in flats])[:numel].float().view(shape)
                         for key in flats[0]}
        offset += piece
    return tensors, step


def _plain_engine_weights(tag_dir: Path, layout: Layout, tp_rank: int) -> dict[str, torch.Tensor]:
    """One tensor rank's weights from the plain engine's files (canonical names, this rank's shards)."""
    path = model_states_file(tag_dir, tp_rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    module = torch.load(path, map_location="cpu", weights_only=False)[ds_format.MODULE_STATE]
    weights = {name: value.float() for name, value in module.items()}
    if checkpoint_zero_stage(tag_dir) == 3:  # the parameters from their partitions; buffers are whole in `module`
        weights.update({name: tensors["fp32"] for name, tensors in read_zero3_tensors(tag_dir, layout, tp_rank)[0].items()})
    return weights


def read_model_weights(tag_dir: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint of any (tp, pp, dp, ep) and engine -> the canonical state dict (fp32); the
    routed experts of an ep > 1 checkpoint from its expert files (trainer/checkpoint/expert_files.py)."""
    layout = read_layout(tag_dir)
    weights = _read_deepspeed_weights(tag_dir, config, layout)
    experts = read_experts(tag_dir, config, layout.tp, layout.pp, canonical_name)
    if experts is not None:
        weights.update(experts[0]["fp32"])
    return weights


def _read_deepspeed_weights(tag_dir: Path, config: ModelConfig, layout: Layout) -> dict[str, torch.Tensor]:
    """The canonical weights from DeepSpeed's files (at ep > 1 the experts there are data rank 0's block only)."""
    if not is_pipeline_checkpoint(tag_dir):
        return merge_states([_plain_engine_weights(tag_dir, layout, tp_rank) for tp_rank in range(layout.tp)], config)
    tp = layout.tp
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
