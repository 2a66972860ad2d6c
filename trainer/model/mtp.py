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

Where the shift happens: on the batch side, once, on whole rows (mtp_batch, called by trainer/engine/loop.py's
pipeline_format before the context-parallel split), never inside the model. The batch hands the model the
next-token ids (input_ids[t+1], or NO_NEXT_TOKEN where t+1 is in another sample) as a fifth input, and the loss the
MTP labels and loss mask in its target; a context-parallel chunk's slots then hold their true t+1 and t+2 whatever
chunk those live in (trainer/parallel/context.py cuts the shifted tensors with the same indices), and one
definition serves pp = 1, the pipeline's stages and cp > 1.

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


NO_NEXT_TOKEN = -1
"""The next-token id of a slot whose t+1 is in another sample (or past the row): its embedding is zero."""


class MTPOutputs(NamedTuple):
    """What the MTP layer hands the output head and the loss in training."""
    main: torch.Tensor
    """The main model's final hidden state [b, s, h] (predicts labels[t])."""
    mtp: torch.Tensor
    """The MTP layer's final hidden state [b, s, h] (predicts labels[t+1])."""


class MTPBatch(NamedTuple):
    """The MTP layer's batch fields [b, s], derived from whole rows (mtp_batch)."""
    next_input_ids: torch.Tensor
    """input_ids[t+1] where t+1 is in t's sample, else NO_NEXT_TOKEN (the model's fifth input)."""
    labels: torch.Tensor
    """labels[t+1]: the token the MTP layer predicts at t."""
    loss_mask: torch.Tensor
    """loss_mask[t+1] where t+1 is in t's sample, else 0."""


def next_in_sample(segment_start: torch.Tensor) -> torch.Tensor:
    """segment_start [b, s] -> [b, s] bool, True where slot t+1 exists and starts no other sample than t's."""
    keep = torch.zeros_like(segment_start, dtype=torch.bool)
    keep[:, :-1] = segment_start[:, 1:] == segment_start[:, :-1]
    return keep


def mtp_batch(input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
              segment_start: torch.Tensor) -> MTPBatch:
    """Whole rows [b, s] -> the MTP layer's batch fields [b, s] (the one place the row is shifted for it)."""
    keep = next_in_sample(segment_start)
    # the wrapped last column is never used (keep is False there)
    next_ids = torch.where(keep, torch.roll(input_ids, -1, dims=1), torch.full_like(input_ids, NO_NEXT_TOKEN))
    shifted_mask = torch.roll(loss_mask, -1, dims=1) * keep.to(loss_mask.dtype)
    return MTPBatch(next_ids, torch.roll(labels, -1, dims=1), shifted_mask)


def embed_next_tokens(embedding: GLMEmbedding, inputs: tuple) -> tuple:
    """The MTP layer's input piece, the word embedding (tied): (final hidden, position_ids, block_position_ids,
    segments, next_input_ids) -> the same plus E_word[x_{t+1}] [b, s, h] ([b, s/tp, h] sequence-parallel), zero
    where t+1 is in another sample (NO_NEXT_TOKEN). Eval mode: the tuple unchanged."""
    if not embedding.training:
        return inputs
    if len(inputs) < 5:
        raise ValueError("the MTP layer trains on batches that carry the next-token ids: build them with "
                         "trainer/engine/loop.py's micro_batches(..., mtp=True)")
    next_ids = inputs[4]
    keep = (next_ids != NO_NEXT_TOKEN)[..., None].to(inputs[0].dtype)  # [b, s, 1]
    keep = scatter_to_sequence(keep, embedding.sequence_group)  # [b, s/tp, 1] sequence-parallel
    embedded = embedding.word_embeddings(next_ids.clamp(min=0)) * keep  # [b, s, h] or [b, s/tp, h]
    return (*inputs, embedded)


class MTPLayer(nn.Module):
    """MTP depth `depth` (1-based): (final hidden, position_ids, block_position_ids, segments, next_input_ids,
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
        return MTPOutputs(main, mtp)
