"""GLM as a DeepSpeed PipelineModule: the model's one description (trainer/model/glm.py: glm_pieces) as a
flat list of LayerSpecs cut into stages.

    [TiedLayerSpec embed -> GLMEmbedding, GLMBlock 1 .. N, FinalLayerNorm, output head]
The output head is the embedding again (TiedLayerSpec, tied output layer) or an OutputLayer (untied); either
hands the loss (hidden, output weight), as the single-process GLMModel does (trainer/model/output.py).
With an MTP layer (model.mtp_layers, trainer/model/mtp.py) the last stage runs it between the final norm and
the output head, beside the loss that adds its term:
    [.., FinalLayerNorm, TiedLayerSpec embed (token t+1's embedding), MTPLayer, output head]
The word embedding there is a tied copy of the first stage's (untied output layer or not): DeepSpeed builds it
from the first stage's weight and sums the two copies' gradients before the optimizer step, as for a tied head.

Between stages travel only (hidden [b, s, h], position_ids [b, s], block_position_ids [b, s], segments
[b, 2, s]), with an MTP layer also the next-token ids [b, s] (the last stage's token t+1, trainer/model/mtp.py
mtp_batch; the labels reach the last stage only, as the loss's target): each stage rebuilds the attention mask
from `segments` (trainer/model/mask.py), never a dense [s, s] mask. With sequence parallelism hidden is each
tensor rank's own tokens [b, s/tp, h], so DeepSpeed's partitioning of the first activation over the tensor ranks
(which takes it to be the same on every rank) is turned off (engine/ds_config.py): the stages send s/tp tokens per
rank either way. Layer indices in the
list are global, so DeepSpeed's per-layer checkpoint files (layer_XX-model_states.pt) name the same
weights under every pipeline split.
"""
from __future__ import annotations

from typing import Callable, Optional

from deepspeed.pipe import LayerSpec, TiedLayerSpec

from trainer.engine.deepspeed_compat import BoundedPipelineModule
from trainer.engine.ds_topology import pipe_topology
from trainer.engine.partition import stage_layer_bounds
from trainer.model.glm import GLMLoss, Piece, glm_pieces
from trainer.model.config import ModelConfig
from trainer.parallel.topology import Topology


def layer_spec(piece: Piece):
    """A piece of the model's description (trainer/model/glm.py) as DeepSpeed builds it on its stage: a
    TiedLayerSpec where pieces share a module (built on the first stage that holds one of them, its weight
    tied across stages), else a LayerSpec (only tied pieces have a forward_fn: Piece)."""
    if piece.tie is None:
        return LayerSpec(piece.module, *piece.args)
    return TiedLayerSpec(piece.tie.key, piece.module, *piece.args, forward_fn=piece.forward_fn,
                         tied_weight_attr=piece.tie.weight)


def build_layer_specs(model: ModelConfig, topology: Topology, seed: int, sequence_parallel: bool = False) -> list:
    """The flat layer list of the GLM pipeline, glm_pieces in order (global indices: 0 embedding, 1..N blocks,
    N+1 norm, N+2 output head; with an MTP layer N+2 token t+1's embedding, N+3 the MTP layer, N+4 the head)."""
    return [layer_spec(piece) for piece in glm_pieces(model, topology.tp_group, seed, topology.ep_group,
                                                      sequence_parallel, topology.cp_group)]


def recomputed_layers(model: ModelConfig) -> list[str]:
    """Layer classes a recompute range may hold (PipelineModule's checkpointable_layers): those of every piece
    but the output head (the tied one is a partial that hands its weight to the loss, whose logits are computed
    there)."""
    return sorted({piece.module.__name__ for piece in glm_pieces(model) if piece.role != "head"})


class GLMPipeline(BoundedPipelineModule):
    """The PipelineModule with GLM's stage split: blocks balanced, the first and last stage carrying the
    embedding and the output layer in place of a block (trainer/engine/partition.py), the last one the pieces
    after the last block (final norm, the MTP layer, output head)."""

    def __init__(self, model: ModelConfig, topology: Topology, seed: int,
                 recompute_interval: int = 0, recompute: Optional[Callable] = None, sequence_parallel: bool = False):
        self._num_blocks = model.num_layers
        specs = build_layer_specs(model, topology, seed, sequence_parallel)
        self._tail = len(specs) - 1 - model.num_layers  # the pieces after the last block
        kwargs = {"activation_checkpoint_func": recompute} if recompute else {}  # DeepSpeed's names
        super().__init__(layers=specs,
                         topology=pipe_topology(topology.layout),
                         loss_fn=GLMLoss(model, topology.tp_group),
                         activation_checkpoint_interval=recompute_interval,
                         checkpointable_layers=recomputed_layers(model),
                         **kwargs)

    def stage_bounds(self, num_stages: int) -> list[int]:
        return stage_layer_bounds(self._num_blocks, num_stages, self._tail)
