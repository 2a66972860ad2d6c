"""GLM's output layer: final hidden states -> vocabulary-parallel logits, through the word embedding (tied)
or a weight of its own.

    logits = x_final W^T,   W = E_word (tied: GLM, GLM-130B, ChatGLM-6B) or W_out (ChatGLM2/3, GLM-4)
W [V_pad, h] is split by vocabulary rows, so rank r computes its V_pad / tp columns of the logits.
One head for every layout: the model's last piece (the single-process GLMModel and the pipeline's last stage
alike) hands on (hidden, W) (`head_outputs`), and `vocab_parallel_logits` turns that into logits: GLMLoss at
the positions the loss counts only, GLMModel.forward at every position. With sequence parallelism head_outputs
first gathers the final hidden states' tokens [b, s/tp, h] -> [b, s, h]: the vocabulary-parallel cross entropy
needs every token's logits on every tensor rank (each holds V/tp columns of them), and its gradient, summed over
the vocabulary shards by the logits' copy_to_tp, is whole on every rank, so the gather's backward keeps this
rank's tokens (an all-reduce over the [n, h] counted positions in backward, in place of Megatron's
reduce-scatter over all s).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.config import ModelConfig
from trainer.model.init import normal_init
from trainer.parallel.layers import sharded_parameter
from trainer.parallel.mappings import copy_to_tp
from trainer.parallel.sequence import gather_from_sequence
from trainer.parallel.split import SplitRule

OUTPUT_WEIGHT = "output_layer.weight"
"""The canonical name of the untied output weight."""


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, tp_group=None) -> torch.Tensor:
    """[..., h] -> [..., V_pad / tp] (the input is copied to the group, so its gradient is summed over the
    vocabulary shards)."""
    return F.linear(copy_to_tp(hidden, tp_group), weight)


def head_outputs(head: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the last piece hands the loss: (final hidden [b, s, h], the output weight [V_pad / tp, h]) of
    `head`, a GLMEmbedding (tied) or an OutputLayer; sequence-parallel hidden states [b, s/tp, h] are gathered."""
    if not isinstance(hidden, torch.Tensor):  # the MTP layer's outputs (trainer/model/mtp.py), gathered there
        return hidden, head.output_weight
    return gather_from_sequence(hidden, head.sequence_group), head.output_weight


class OutputLayer(nn.Module):
    """The untied output layer: its own vocabulary-parallel weight [V_pad / tp, h], padding rows zero (split like
    the word embedding)."""

    def __init__(self, config: ModelConfig, tp_group=None, seed: int = 0, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_group = tp_group if sequence_parallel else None
        """The group the final hidden states arrive split over along the sequence (None: whole)."""
        self.rule = SplitRule.vocabulary(config.vocab_size, config.vocab_pad_multiple)
        self.weight = sharded_parameter((config.vocab_size, config.hidden_size), self.rule, tp_group,
                                        normal_init(seed, "output_layer", config.init_std))

    def split_rules(self) -> dict[str, SplitRule]:
        return {"weight": self.rule}

    @property
    def output_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return head_outputs(self, hidden)
