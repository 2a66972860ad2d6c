"""GLM's input embedding, also the tied output layer's weight (one module, so the pipeline can tie it across
stages; the logits are made in trainer/model/output.py).

    x = E_word[input_ids] (+ E_pos[position_ids] + E_block[block_position_ids] for learned_2d)
    x = x * a + x.detach() * (1 - a)            (embedding-gradient shrink, GLM-130B a = 0.1)
With sequence parallelism (trainer/parallel/sequence.py) x leaves as this tensor rank's tokens [b, s/tp, h]: the
word embedding reduce-scatters its partial lookups and the position tables, looked up on the whole row, keep this
rank's tokens (so their gradients are whole on every rank).
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.model.config import ModelConfig
from trainer.model.init import normal_init
from trainer.parallel.layers import VocabParallelEmbedding
from trainer.parallel.sequence import region_rng, scatter_to_sequence
from trainer.parallel.split import REPLICATED, SplitRule

Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""What flows between pipeline pieces: (hidden [b, s, h], position_ids [b, s], block_position_ids [b, s],
segments [b, 2, s]); segments describe the samples of each row for the mask (trainer/model/mask.py)."""


def shrink_embedding_gradient(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x * alpha + x.detach() * (1 - alpha): the same value, the gradient into x scaled by alpha."""
    if alpha == 1.0:
        return x
    return x * alpha + x.detach() * (1.0 - alpha)


def _position_table(rows: int, width: int, init) -> nn.Embedding:
    weight = torch.empty(rows, width)
    init(weight)  # before the module exists: under ZeRO-3's zero.Init its weight is partitioned when built
    return nn.Embedding(rows, width, _weight=weight)  # _weight: no draw from the global RNG


class GLMEmbedding(nn.Module):
    """The first pipeline piece (forward) and, when the output layer is tied, its weight (output_weight).
    with_positions=False builds the word embedding alone: the copy on the last pipeline stage only
    serves the output layer, so it carries no position tables. sequence_parallel: the hidden states leave split
    along the sequence, and the output head (head_outputs) gathers them back."""

    def __init__(self, config: ModelConfig, tp_group=None, seed: int = 0, with_positions: bool = True,
                 sequence_parallel: bool = False):
        super().__init__()
        if config.vocab_size <= 0:
            raise ConfigError("model.vocab_size is 0 when building the model: set it, or let the trainer take "
                              "it from the tokenizer before the model is built")
        h = config.hidden_size
        self.shrink_alpha = config.embedding_shrink_alpha
        self.sequence_parallel = sequence_parallel
        self.sequence_group = tp_group if sequence_parallel else None
        """The group the hidden states are split over along the sequence (None: whole on every rank)."""
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, h, group=tp_group, pad_multiple=config.vocab_pad_multiple,
            init_method=normal_init(seed, "word_embeddings", config.init_std), sequence_parallel=sequence_parallel)
        self.learned_positions = with_positions and config.position_embedding == "learned_2d"
        if self.learned_positions:
            rows = config.max_sequence_length
            self.position_embeddings = _position_table(
                rows, h, normal_init(seed, "position_embeddings", config.init_std))
            self.block_position_embeddings = _position_table(
                rows, h, normal_init(seed, "block_position_embeddings", config.init_std))
        self.dropout = nn.Dropout(config.hidden_dropout)

    def split_rules(self) -> dict[str, SplitRule]:
        """The position tables are replicated (the word embedding declares its own rule)."""
        tables = ("position_embeddings.weight", "block_position_embeddings.weight") if self.learned_positions else ()
        return {name: REPLICATED for name in tables}

    def forward(self, inputs: Activations) -> Activations:
        """(input_ids, position_ids, block_position_ids, segments) -> (hidden [b, s, h], the same ids, segments)."""
        input_ids, position_ids, block_position_ids, segments = inputs
        hidden = self.word_embeddings(input_ids)  # [b, s, h], or [b, s/tp, h] sequence-parallel
        if self.learned_positions:
            hidden = (hidden + scatter_to_sequence(self.position_embeddings(position_ids), self.sequence_group)
                      + scatter_to_sequence(self.block_position_embeddings(block_position_ids), self.sequence_group))
        hidden = shrink_embedding_gradient(hidden, self.shrink_alpha)
        with region_rng(self.sequence_parallel and self.training and self.dropout.p > 0):
            hidden = self.dropout(hidden)
        return hidden, position_ids, block_position_ids, segments

    @property
    def output_weight(self) -> torch.Tensor:
        """The tied output layer's weight [V_pad / tp, h]."""
        return self.word_embeddings.weight
