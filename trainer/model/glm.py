"""The whole GLM: the pipeline pieces composed into one single-process module, plus the loss.

    GLMEmbedding -> GLMBlock 1 .. N -> FinalLayerNorm -> output head (tied embedding or OutputLayer)  | GLMLoss
The same pieces are the DeepSpeed pipeline's LayerSpecs (trainer/engine/pipeline.py).
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.model.block import GLMBlock
from trainer.model.config import ModelConfig
from trainer.model.embedding import Activations, GLMEmbedding
from trainer.model.norm import Norm
from trainer.model.output import OutputLayer, head_outputs, vocab_parallel_logits
from trainer.parallel.cross_entropy import masked_mean, vocab_parallel_cross_entropy


class FinalLayerNorm(Norm):
    """The normalisation after the last block (config.normalization): activations tuple -> LN(hidden) [b, s, h]."""

    def forward(self, inputs: Activations) -> torch.Tensor:
        return super().forward(inputs[0])


class GLMLoss(nn.Module):
    """Loss = sum(CE * loss_mask) / sum(loss_mask), CE in fp32 over the vocabulary-parallel logits
    (padding columns excluded). labels are already shifted: labels[i] is predicted at position i."""

    def __init__(self, config: ModelConfig, tp_group=None):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.tp_group = tp_group

    def forward(self, outputs, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """outputs: logits [b, s, V_pad / tp], or (hidden [b, s, h], the output weight [V_pad / tp, h])
        as the output head hands them over (trainer/model/output.py), in which case the logits are computed only at the
        positions the loss counts (Part B: 15-30% of a GLM sample); target (labels [b, s], loss_mask [b, s])."""
        labels, loss_mask = target
        if isinstance(outputs, tuple):
            hidden, weight = outputs
            counted = loss_mask.reshape(-1) != 0
            hidden = hidden.reshape(-1, hidden.shape[-1])[counted]  # [n, h], n = counted positions
            logits = vocab_parallel_logits(hidden, weight, self.tp_group)  # [n, V_pad / tp]
            labels, loss_mask = labels.reshape(-1)[counted], loss_mask.reshape(-1)[counted]
        else:
            logits = outputs
        per_token = vocab_parallel_cross_entropy(logits, labels, self.tp_group, vocab_size=self.vocab_size)
        return masked_mean(per_token, loss_mask)


class GLMModel(nn.Module):
    """GLM on one pipeline stage. Parameter names follow THUDM/GLM below the top level:
    embedding.word_embeddings, embedding.{block_,}position_embeddings, transformer.layers.{i}.*,
    transformer.final_layernorm, and output_layer.weight when the output layer is untied."""

    def __init__(self, config: ModelConfig, tp_group=None, seed: int = 0):
        super().__init__()
        self.tp_group = tp_group
        self.embedding = GLMEmbedding(config, tp_group, seed)
        self.transformer = nn.ModuleDict({
            "layers": nn.ModuleList(GLMBlock(config, i, tp_group, seed) for i in range(1, config.num_layers + 1)),
            "final_layernorm": FinalLayerNorm(config),
        })
        self.output_layer = None if config.tie_word_embeddings else OutputLayer(config, tp_group, seed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden [b, s, h] -> this rank's logits [b, s, V_pad / tp], by the output head."""
        head = self.embedding if self.output_layer is None else self.output_layer
        return vocab_parallel_logits(*head_outputs(head, hidden), self.tp_group)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, block_position_ids: torch.Tensor,
                segments: torch.Tensor) -> torch.Tensor:
        """Token and position ids [b, s], segments [b, 2, s] (trainer/model/mask.py; one sample per row:
        segments_of_sep) -> this rank's logits [b, s, V_pad / tp]."""
        activations = self.embedding((input_ids, position_ids, block_position_ids, segments))
        for layer in self.transformer["layers"]:
            activations = layer(activations)
        return self.logits(self.transformer["final_layernorm"](activations))
