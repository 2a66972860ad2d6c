"""GLM as a DeepSpeed PipelineModule: a flat list of LayerSpecs cut into stages.

    [TiedLayerSpec embed -> GLMEmbedding, GLMBlock 1 .. N, FinalLayerNorm, output head]
The output head is the embedding again (TiedLayerSpec, tied output layer) or an OutputLayer (untied); either
hands the loss (hidden, output weight), as the single-process GLMModel does (trainer/model/output.py).

Between stages travel only (hidden [b, s, h], position_ids [b, s], block_position_ids [b, s], segments
[b, 2, s]): each stage rebuilds the attention mask from `segments` (trainer/model/mask.py), never a dense
[s, s] mask. Layer indices in the
list are global, so DeepSpeed's per-layer checkpoint files (layer_XX-model_states.pt) name the same
weights under every pipeline split.
"""
from __future__ import annotations

from typing import Callable, Optional

from deepspeed.pipe import LayerSpec, TiedLayerSpec

from trainer.engine.deepspeed_compat import BoundedPipelineModule
from trainer.engine.ds_topology import pipe_topology
from trainer.engine.partition import stage_layer_bounds
from trainer.model import FinalLayerNorm, GLMBlock, GLMEmbedding, GLMLoss
from trainer.model.config import ModelConfig
from trainer.model.output import OutputLayer, head_outputs
from trainer.parallel.topology import Topology

TIED_KEY = "embed"
TIED_WEIGHT = "word_embeddings.weight"


def build_layer_specs(model: ModelConfig, topology: Topology, seed: int) -> list:
    """The flat layer list of the GLM pipeline (global indices: 0 embedding, 1..N blocks, N+1 norm, N+2 output)."""
    tp_group = topology.tp_group
    specs = [TiedLayerSpec(TIED_KEY, GLMEmbedding, model, tp_group, seed, tied_weight_attr=TIED_WEIGHT)]
    specs += [LayerSpec(GLMBlock, model, layer_number, tp_group, seed) for layer_number in range(1, model.num_layers + 1)]
    specs.append(LayerSpec(FinalLayerNorm, model))
    if model.tie_word_embeddings:
        # Built only where the stage has no embedding yet (pp > 1): the word embedding alone.
        specs.append(TiedLayerSpec(TIED_KEY, GLMEmbedding, model, tp_group, seed, False, forward_fn=head_outputs,
                                   tied_weight_attr=TIED_WEIGHT))
    else:
        specs.append(LayerSpec(OutputLayer, model, tp_group, seed))
    return specs


RECOMPUTED_LAYERS = ["GLMEmbedding", "GLMBlock", "FinalLayerNorm"]
"""Layer classes a recompute range may hold (PipelineModule's checkpointable_layers): never the output head
(the tied one is a partial that hands its weight to the loss, whose logits are computed there)."""


class GLMPipeline(BoundedPipelineModule):
    """The PipelineModule with GLM's stage split: blocks balanced, the first and last stage carrying the
    embedding and the output layer in place of a block (trainer/engine/partition.py)."""

    def __init__(self, model: ModelConfig, topology: Topology, seed: int,
                 recompute_interval: int = 0, recompute: Optional[Callable] = None):
        self._num_blocks = model.num_layers
        kwargs = {"activation_checkpoint_func": recompute} if recompute else {}  # DeepSpeed's names
        super().__init__(layers=build_layer_specs(model, topology, seed),
                         topology=pipe_topology(topology.layout),
                         loss_fn=GLMLoss(model, topology.tp_group),
                         activation_checkpoint_interval=recompute_interval,
                         checkpointable_layers=RECOMPUTED_LAYERS,
                         **kwargs)

    def stage_bounds(self, num_stages: int) -> list[int]:
        return stage_layer_bounds(self._num_blocks, num_stages)
