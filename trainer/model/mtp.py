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
    segments, input_ids) -> the same plus E_word[input_ids[t+1]] [b, s, h], zero where t+1 is in another sample.
    Eval mode: the tuple unchanged."""
    if not embedding.training:
        return inputs
    input_ids, segments = inputs[4], inputs[3]
    keep = next_in_sample(segments[:, 0])  # segments [b, 2, s]: (segment_start, segment_sep)
    next_ids = torch.roll(input_ids, -1, dims=1)  # [b, s]
    embedded = embedding.word_embeddings(next_ids) * keep[..., None].to(inputs[0].dtype)  # [b, s, h]
    return (*inputs, embedded)


class MTPLayer(nn.Module):
    """MTP depth `depth` (1-based): (final hidden, position_ids, block_position_ids, segments, input_ids,
    next-token embedding) -> MTPOutputs in training, the final hidden [b, s, h] in eval mode (module docstring).
    Its block is block number num_layers + depth (a mixture-of-experts block where config.is_moe_layer says so)."""

    def __init__(self, config: ModelConfig, depth: int, tp_group=None, seed: int = 0, ep_group=None):
        super().__init__()
        h = config.hidden_size
        self.enorm = Norm(config)
        self.hnorm = Norm(config)
        # Y = X A^T, A [h, 2h] split by rows over tp and gathered: the input and output are replicated.
        self.eh_proj = ColumnParallelLinear(2 * h, h, group=tp_group, bias=False, gather_output=True,
                                            init_method=normal_init(seed, f"{MTP_PREFIX}.{depth - 1}.eh_proj",
                                                                    config.init_std))
        self.block = GLMBlock(config, config.num_layers + depth, tp_group, seed, ep_group)
        self.final_layernorm = Norm(config)

    def forward(self, inputs: tuple):
        if not self.training:
            return inputs[0]
        hidden, position_ids, block_position_ids, segments, _, embedded = inputs
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))  # [b, s, 2h] -> [b, s, h]
        x = self.block((x, position_ids, block_position_ids, segments))[0]
        return MTPOutputs(hidden, self.final_layernorm(x), next_in_sample(segments[:, 0]))
