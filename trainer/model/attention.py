"""GLM self-attention: fused QKV on a column-parallel layer (each tensor-parallel rank holds whole heads),
optional RoPE, the blank-infilling mask, and a row-parallel output projection.

    [q; k; v] = x W_qkv^T,  q, k <- rope(q), rope(k) (RoPE configs),
    o = softmax(q k^T / sqrt(d), masked) v   per head,   y = o W_dense^T
The mask is GLM's blank-infilling mask, block-diagonal over the samples packed in a row (trainer/model/mask.py).
Grouped-query attention (ChatGLM2/3, GLM-4): q has n heads, k and v have g = num_key_value_heads, and query
head j attends with key/value head j // (n / g); g = n is multi-head attention, g = 1 multi-query attention.
W_qkv is fused (split rule: trainer/parallel/split.py): rank r's rows are [q_r; k_r; v_r], the r-th of tp row
blocks of each of q, k, v.
Rank r computes n / tp query heads and the key/value heads they use:
- tp divides g (split KV heads): k_r and v_r are exactly those g / tp heads, and no rank shares a KV head;
- tp a multiple of g (replicated KV heads, e.g. multi-query attention at tp = 2): the tp / g ranks whose query
  heads share key/value head j = r g / tp each compute it. k_r and v_r still hold 1/tp of the K and V rows (the
  same parameters and canonical layout as at any tp), and each rank gathers the whole K and V projection weight
  (gather_rows_from_tp), keeps head j's rows and uses them. Its gradient of the gathered weight covers only its own
  query heads; the reduce-scatter in the gather's backward sums the ranks' shares, so each rank's k_r, v_r get the
  full gradient of the rows it stores: parameters and gradients are disjoint shards, counted in the gradient norm
  like every other split weight. Cost: an all-gather of the 2 g d x h K/V weight (and bias) per block forward.
Attention-probability dropout draws from the tensor-parallel RNG stream (each rank's heads differ).
Context parallelism (cp_group, trainer/parallel/context.py): the rank holds its chunks of each row; its queries
attend to the whole row's keys and values, all-gathered over the cp ranks after RoPE (each chunk rotated at its
own positions) and before the grouped-query repeat (g heads travel, not n), under its rows of the mask
(GLMMask.chunk).

Kernels. The mask arrives either dense (a bool tensor, True = may attend) or compact (`GLMMask`: the rows'
segments [b, 2, s]). A GLMMask is built once per micro-batch and shared by every block that sees the same
`segments` tensor; it is served to the kernels as
- a FlexAttention block mask on an accelerator (no dropout, no FP32-softmax switch, no KV cache): the
  tiles wholly hidden (between two packed samples, above the diagonal right of a sep) are skipped, the
  wholly visible ones run unmasked;
- otherwise to SDPA as an additive float mask built once per micro-batch (given a bool mask, SDPA would
  convert it to that float mask in every layer), or as the bool mask to the FP32-softmax formula.
"""
from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from trainer.model.config import ModelConfig
from trainer.model.init import fused_normal_init, normal_init, xavier_normal_std
from trainer.model.mask import GLMMask
from trainer.model.rotary import apply_position_rotary
from trainer.parallel.context import gather_row
from trainer.parallel.layers import ColumnParallelLinear, RowParallelLinear
from trainer.parallel.mappings import copy_to_tp, gather_rows_from_tp, group_rank, group_size
from trainer.parallel.random import get_rng_tracker

MASKED_SCORE = -65504.0
"""The fill of masked scores: the most negative fp16 number, as in the reference code."""


def fp32_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           layer_number: int, dropout: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """GLM-130B's FP32 softmax with query-key layer scaling, c = layer_number (1-based):
        scores = (q / (sqrt(d) c)) k^T    in the compute dtype (c keeps fp16 scores from overflowing)
        probs  = softmax(fp32(scores) * c, masked -65504)   in fp32, cast back to the compute dtype.
    q, k, v [b, n, s, d]; mask [b, 1, s_q, s_k] bool (True = may attend) -> [b, n, s, d]."""
    scale = math.sqrt(q.shape[-1]) * layer_number
    scores = torch.matmul(q / scale, k.transpose(-1, -2))  # [b, n, s_q, s_k]
    scores = (scores.to(torch.float32) * layer_number).masked_fill(~mask, MASKED_SCORE)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(dropout(probs), v)


@functools.cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def flex_glm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: GLMMask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), GLM mask) v by FlexAttention's fused kernel (compiled on first use), skipping
    the tiles the mask hides. q, k, v [b, n, s, d] -> [b, n, s, d]. On CPU FlexAttention has no backward and
    runs eagerly (the reference math), so training on CPU takes SDPA instead."""
    kernel = flex_attention if q.device.type == "cpu" else _compiled_flex_attention()
    return kernel(q, k, v, block_mask=mask.block_mask())


AttentionMask = Union[torch.Tensor, GLMMask]
"""A dense [b, 1, s_q, s_k] bool mask (True = may attend) or the compact GLMMask."""


class KVCache:
    """Keys and values of earlier positions, [b, g, s_past, d] each (g key/value heads), for incremental decoding."""

    def __init__(self) -> None:
        self.key: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' key/value [b, g, s_new, d]; return all positions' [b, g, s_past + s_new, d]."""
        if self.key is not None:
            key = torch.cat([self.key, key], dim=2)
            value = torch.cat([self.value, value], dim=2)
        self.key, self.value = key, value
        return key, value


class QueryKeyValue(ColumnParallelLinear):
    """[q; k; v] = x W_qkv^T + b on a column-parallel layer holding rank r's rows [q_r; k_r; v_r]. With replicated
    KV heads (module docstring) the rank gathers the whole K and V rows and uses those of the one key/value head
    its query heads share: [q_r; K_j; V_j]. The weights are read only in this module's own forward, where
    ZeRO-3 has gathered them."""

    def __init__(self, config: ModelConfig, tp_group, init_method: Callable[[torch.Tensor], None]):
        super().__init__(config.hidden_size, sum(config.qkv_rows), group=tp_group, bias=config.add_qkv_bias,
                         init_method=init_method, parts=config.qkv_rows)
        tp = group_size(tp_group)
        self.replicated_kv = config.replicates_kv_heads(tp)
        self.q_rows = config.qkv_rows[0] // tp
        kv_head = group_rank(tp_group) * config.num_kv_heads // tp  # the KV head of this rank's query heads
        self.kv_used = slice(kv_head * config.head_dim, (kv_head + 1) * config.head_dim)  # its rows in K or V

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, h] -> [b, s, (n/tp + 2 g_r) d], g_r = g / tp key/value heads (split) or 1 (replicated)."""
        if not self.replicated_kv:
            return super().forward(x)
        tp = group_size(self.group)
        parts = []
        for local in (self.weight, self.bias) if self.bias is not None else (self.weight,):  # [(n + 2 g) d/tp, ...]
            kv = gather_rows_from_tp(local[self.q_rows:], self.group)  # [tp * 2 g d/tp, ...]: [k_r; v_r] of every r
            kv = kv.unflatten(0, (tp, 2, -1)).transpose(0, 1).flatten(1, 2)  # [2, g d, ...]: whole K, whole V
            rows = [local[:self.q_rows], kv[0, self.kv_used], kv[1, self.kv_used]]
            parts.append(torch.cat(rows))  # [(n/tp + 2) d, ...]: q_r, K_j, V_j
        return F.linear(copy_to_tp(x, self.group), *parts)  # the input's gradient summed, as super().forward's


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention of block `layer_number` (1-based); each tensor-parallel
    rank computes num_attention_heads / tp whole heads and the row-parallel dense layer sums their
    contributions. With a cp_group the rank's tokens are its context-parallel chunks of each row."""

    def __init__(self, config: ModelConfig, layer_number: int, tp_group=None, seed: int = 0, cp_group=None):
        super().__init__()
        self.cp_group = cp_group
        h, n = config.hidden_size, config.num_layers
        tp = group_size(tp_group)
        q_rows, kv_rows, _ = config.qkv_rows
        self.config = config
        self.layer_number = layer_number
        self.local_heads = config.num_attention_heads // tp
        self.local_kv_heads = 1 if config.replicates_kv_heads(tp) else config.num_kv_heads // tp
        if config.norm == "deepnorm":  # DeepNet: q, k gain 1; v and the output projection gain beta
            qkv_stds = (xavier_normal_std(1.0, h, q_rows), xavier_normal_std(1.0, h, kv_rows),
                        xavier_normal_std(config.deepnorm_beta, h, kv_rows))
            dense_std = xavier_normal_std(config.deepnorm_beta, h, h)
        else:
            qkv_stds = (config.init_std,) * 3
            dense_std = config.init_std / math.sqrt(2 * n)
        name = f"layers.{layer_number - 1}.attention"
        self.query_key_value = QueryKeyValue(
            config, tp_group, fused_normal_init(seed, f"{name}.query_key_value", qkv_stds, config.qkv_rows))
        self.dense = RowParallelLinear(q_rows, h, group=tp_group, bias=config.add_bias_linear,
                                       init_method=normal_init(seed, f"{name}.dense", dense_std))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, block_position_ids: torch.Tensor,
                mask: AttentionMask, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """hidden [b, s, h], position ids [b, s], mask [b, 1, s, s_k] bool (True = may attend) or a GLMMask
        -> [b, s, h]. With a kv_cache, hidden holds only the new positions and the mask (dense) counts the
        cached ones too in s_k."""
        b, s, _ = hidden.shape
        d = self.config.head_dim
        heads = (self.local_heads, self.local_kv_heads, self.local_kv_heads)
        qkv = self.query_key_value(hidden).view(b, s, sum(heads), d)  # [b, s, n/tp + 2 g_r, d]
        q, k, v = qkv.split(heads, dim=2)  # [b, s, n/tp, d], [b, s, g_r, d] twice; g_r = g/tp, or 1 if replicated
        if self.config.position_embedding != "learned_2d":
            q = apply_position_rotary(q, position_ids, block_position_ids, self.config)
            k = apply_position_rotary(k, position_ids, block_position_ids, self.config)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads/tp, s, d]
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # [b, g_r, s_k, d]
        if self.cp_group is not None:  # s = this rank's s_row / cp tokens; keys and values of the whole row
            if kv_cache is not None or not isinstance(mask, GLMMask):
                raise ValueError("context parallelism trains on whole rows: no KV cache, the mask as a GLMMask")
            k, v = gather_row(k, self.cp_group, dim=2), gather_row(v, self.cp_group, dim=2)  # [b, g_r, s_row, d]
            mask = mask.chunk(group_size(self.cp_group), group_rank(self.cp_group))
        group = self.local_heads // self.local_kv_heads
        if group > 1:  # each key/value head serves `group` consecutive query heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [b, n/tp, s_k, d]
        p = self.config.attention_dropout if self.training else 0.0
        with get_rng_tracker().fork() if p > 0 else nullcontext():  # only dropout draws random numbers
            context = self._core(q, k, v, mask, p)  # [b, n/tp, s, d]
        context = context.transpose(1, 2).reshape(b, s, self.local_heads * d)  # [b, s, n d/tp]
        return self.dense(context)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, p: float) -> torch.Tensor:
        """Scaled dot-product attention with dropout probability p on the probabilities (kernels: module docstring)."""
        if isinstance(mask, GLMMask):
            flex = q.device.type != "cpu" and p == 0.0 and not self.config.fp32_softmax_layer_scaling
            if flex and q.shape[-2] == mask.seq_length and k.shape[-2] == mask.num_keys:
                return flex_glm_attention(q, k, v, mask)
            if not self.config.fp32_softmax_layer_scaling:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q.dtype), dropout_p=p)
            mask = mask.dense()
        if self.config.fp32_softmax_layer_scaling:
            return fp32_softmax_attention(q, k, v, mask, self.layer_number, lambda probs: F.dropout(probs, p))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

