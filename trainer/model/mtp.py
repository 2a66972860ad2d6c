"""Multi-token prediction (MTP): DeepSeek-V3's MTP module as GLM-4.5 ships it (num_nextn_predict_layers = 1).

At position t the layer predicts token t+2 from the main model's final hidden state h_t (after the final norm)
and the embedding of token t+1:
    h'_t = eh_proj([enorm(E_word[x_{t+1}]); hnorm(h_t)])      eh_proj [h, 2h], the embedding half first
    m_t  = final_layernorm(Block(h'_t))                        one transformer block (MoE where the model is)
    p(x_{t+2} | ...) = softmax(m_t W_out^T)                    the model's own output head, shared
Its loss is the mean cross entropy over its loss tokens, added to the main loss times model.mtp_loss_weight.

What t+1 and t+2 mean in a GLM row. `labels[t]` is the token predicted at t (already shifted: trainer/data), so
the main model predicts labels[t] and the MTP layer predicts labels[t+1], taking the input token x_{t+1} =
input_ids[t+1]. "t+1" is the next slot of the row *within t's sample*: the pair counts only where slot t+1 has
the same segment_start as t (trainer/model/mask.py), never across a packed-sample boundary (nor past the row's
end, nor into the padding, a segment of its own), and where labels[t+1] is a loss token (loss_mask[t+1] = 1).
In blank infilling that is Part B: inside a span, x_{t+1} is the span's next token and labels[t+1] the one after;
at the last Part A slot x_{t+1} is the first span's [sop] and labels[t+1] its first token; across two spans of
one sample x_{t+1} is the next span's [sop]. The block reuses t's 2D positions and GLM's mask, so slot t sees
the embeddings of tokens up to t+1 and nothing of labels[t+1]. Where t+1 is in another sample (or past the row),
the embedding is zero: no slot sees a token of another sample.

Sequence parallelism: the final hidden and the next-token embedding arrive as this tensor rank's tokens
[b, s/tp, h], as do the block's; eh_proj gathers the sequence and the result is split back, and the layer hands
the head both hidden states gathered to [b, s, h] (their gradients are whole on every rank, as head_outputs').

The MTP layer is a training objective only: in eval mode (the validation loss, decoding, scoring) it passes the
main hidden state on unchanged and costs nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from trainer.model.block import GLMBlock
from trainer.model.config import ModelConfig
from trainer.model.embedding import GLMEmbedding
from trainer.model.init import normal_init
from trainer.model.norm import Norm
from trainer.parallel.layers import ColumnParallelLinear
from trainer.parallel.sequence import gather_from_sequence, scatter_to_sequence, sum_grad_over_tp_

MTP_PREFIX = "mtp.layers"
"""The canonical prefix of the MTP layers' parameters: mtp.layers.{k}.{enorm,hnorm,eh_proj,block.*,final_layernorm}."""


class MTPOutputs(NamedTuple):
    """What the MTP layer hands the output head and the loss in training."""
    main: torch.Tensor
    """The main model's final hidden state [b, s, h] (predicts labels[t])."""
    mtp: torch.Tensor
    """The MTP layer's final hidden state [b, s, h] (predicts labels[t+1])."""
    next_in_sample: torch.Tensor
    """[b, s] bool: slot t+1 belongs to t's sample."""


def next_in_sample(segment_start: torch.Tensor) -> torch.Tensor:
    """segment_start [b, s] -> [b, s] bool, True where slot t+1 exists and starts no other sample than t's."""
    keep = torch.zeros_like(segment_start, dtype=torch.bool)
    keep[:, :-1] = segment_start[:, 1:] == segment_start[:, :-1]
    return keep


def mtp_targets(labels: torch.Tensor, loss_mask: torch.Tensor, keep: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP layer's (labels, loss_mask) [b, s]: labels[t+1] at t, counted where t+1 is in t's sample (`keep`,
    next_in_sample) and a loss token."""
    shifted_labels = torch.roll(labels, -1, dims=1)  # the wrapped last column is never counted (keep is False)
    shifted_mask = torch.roll(loss_mask, -1, dims=1) * keep.to(loss_mask.dtype)
    return shifted_labels, shifted_mask


def mtp_loss_mask(loss_mask: torch.Tensor, segment_start: torch.Tensor) -> torch.Tensor:
    """The MTP layer's loss mask [b, s] of a batch's rows (what trainer/engine/step_loss.py counts)."""
    return mtp_targets(loss_mask, loss_mask, next_in_sample(segment_start))[1]


def embed_next_tokens(embedding: GLMEmbedding, inputs: tuple) -> tuple:
    """The MTP layer's input piece, the word embedding (tied): (final hidden, position_ids, block_position_ids,
    segments, input_ids) -> the same plus E_word[input_ids[t+1]] [b, s, h] ([b, s/tp, h] sequence-parallel), zero
    where t+1 is in another sample. Eval mode: the tuple unchanged."""
    if not embedding.training:
        return inputs
    input_ids, segments = inputs[4], inputs[3]
    keep = next_in_sample(segments[:, 0])[..., None].to(inputs[0].dtype)  # segments [b, 2, s] -> [b, s, 1]
    keep = scatter_to_sequence(keep, embedding.sequence_group)  # [b, s/tp, 1] sequence-parallel
    next_ids = torch.roll(input_ids, -1, dims=1)  # [b, s]
    embedded = embedding.word_embeddings(next_ids) * keep  # [b, s, h] or [b, s/tp, h]
    return (*inputs, embedded)


class MTPLayer(nn.Module):
    """MTP depth `depth` (1-based): (final hidden, position_ids, block_position_ids, segments, input_ids,
    next-token embedding) -> MTPOutputs in training, the final hidden [b, s, h] in eval mode (module docstring).
    Its block is block number num_layers + depth (a mixture-of-experts block where config.is_moe_layer says so)."""

    def __init__(self, config: ModelConfig, depth: int, tp_group=None, seed: int = 0, ep_group=None,
                 sequence_parallel: bool = False, cp_group=None):
        super().__init__()
        h = config.hidden_size
        self.sequence_group = tp_group if sequence_parallel else None
        self.enorm = Norm(config)
        self.hnorm = Norm(config)
        # Y = X A^T, A [h, 2h] split by rows over tp and gathered: the output is replicated (sequence-parallel: the
        # input's tokens gathered first, and the output split back along the sequence in forward).
        self.eh_proj = ColumnParallelLinear(2 * h, h, group=tp_group, bias=False, gather_output=True,
                                            sequence_parallel=sequence_parallel,
                                            init_method=normal_init(seed, f"{MTP_PREFIX}.{depth - 1}.eh_proj",
                                                                    config.init_std))
        self.block = GLMBlock(config, config.num_layers + depth, tp_group, seed, ep_group, sequence_parallel,
                              cp_group)
        self.final_layernorm = Norm(config)
        if sequence_parallel:
            for norm in (self.enorm, self.hnorm, self.final_layernorm):
                for param in norm.parameters():
                    sum_grad_over_tp_(param, tp_group)

    def forward(self, inputs: tuple):
        if not self.training:
            return inputs[0]
        hidden, position_ids, block_position_ids, segments, _, embedded = inputs
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))  # [b, s, 2h] -> [b, s, h]
        x = scatter_to_sequence(x, self.sequence_group)  # [b, s/tp, h] sequence-parallel
        x = self.block((x, position_ids, block_position_ids, segments))[0]
        main = gather_from_sequence(hidden, self.sequence_group)  # [b, s, h]
        mtp = gather_from_sequence(self.final_layernorm(x), self.sequence_group)
        return MTPOutputs(main, mtp, next_in_sample(segments[:, 0]))
