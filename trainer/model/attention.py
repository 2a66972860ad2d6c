"""GLM self-attention: fused QKV on a column-parallel layer (each tensor-parallel rank holds whole heads),
optional RoPE, the blank-infilling mask, and a row-parallel output projection.

    [q; k; v] = x W_qkv^T,  q, k <- RMSNorm_q(q), RMSNorm_k(k) per head (QK-norm, GLM-4.5),
    q, k <- rope(q), rope(k) (RoPE configs),
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
QK-norm (config.qk_norm) normalises each head's query and key vector over its d dims with one gain [d] per
projection (q_norm, k_norm), shared by every head and replicated over the tensor-parallel ranks; each rank's
heads contribute only part of that gain's gradient, so the gain enters the forward through copy_to_tp (its
gradient summed over tp).
Attention-probability dropout draws from the tensor-parallel RNG stream (each rank's heads differ).
Context parallelism (cp_group, trainer/parallel/context.py): the rank holds its chunks of each row; its queries
attend to the whole row's keys and values, all-gathered over the cp ranks after RoPE (each chunk rotated at its
own positions; g key/value heads travel, not n), under its rows of the mask (GLMMask.chunk, which kernel_mask
hands the kernel in its form).

Kernels. A micro-batch's mask (`GLMMask`, from the rows' segments [b, 2, s]) is built once and shared by every
block that sees the same `segments` tensor; `SelfAttention.kernel_mask` picks the form its kernel takes, outside
any compiled region (a compiled block receives a tensor or a BlockMask, never the Python cache):
- a FlexAttention BlockMask on an accelerator (no attention dropout, no KV cache): the tiles wholly hidden
  (between two packed samples, above the diagonal right of a sep) are skipped, the wholly visible ones run
  unmasked. GLM-130B's FP32 softmax with layer scaling runs here too: FlexAttention computes its scores and
  softmax in fp32 whatever the input dtype, so the formula is q / (sqrt(d) c) in the compute dtype and a
  score_mod multiplying the fp32 score by c (flex_glm_attention);
- otherwise SDPA's additive float mask built once per micro-batch (given a bool mask, SDPA would convert it to
  that float mask in every layer), or the dense bool mask for the eager FP32-softmax formula
  (`fp32_softmax_attention`: the CPU / dropout path and the reference the FlexAttention form is tested against);
- a KV-cached step (decoding, scoring: `cached_mask`): no mask where every query sees every key (a blank-infilling
  prompt's Part A prefill, a one-token step), SDPA's lower-right causal bias where each sees exactly the keys up
  to itself (a causal prompt's prefill, Part B after a cached Part A), the dense bool rows only where neither is
  exact (and for the eager FP32-softmax formula): a 32768-token prompt's prefill builds no [s, s] mask.
Grouped-query attention goes to the kernels as it is (k, v [b, g, s, d]): SDPA and FlexAttention take enable_gqa,
the eager formula groups the query heads by a view, so K and V are never copied per query head.
"""
from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from trainer.model.config import ModelConfig
from trainer.model.init import fused_normal_init, normal_init, xavier_normal_std
from trainer.model.mask import GLMMask
from trainer.model.norm import rms_norm
from trainer.model.rotary import Rotations, rotate
from trainer.parallel.context import gather_row
from trainer.parallel.layers import ColumnParallelLinear, RowParallelLinear
from trainer.parallel.mappings import copy_to_tp, gather_rows_from_tp, group_rank, group_size
from trainer.parallel.random import get_rng_tracker
from trainer.parallel.split import REPLICATED, SplitRule

MASKED_SCORE = -65504.0
"""The fill of masked scores: the most negative fp16 number, as in the reference code."""


def fp32_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           layer_number: int, dropout: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """GLM-130B's FP32 softmax with query-key layer scaling, c = layer_number (1-based), written out eagerly:
        scores = (q / (sqrt(d) c)) k^T    in the compute dtype (c keeps fp16 scores from overflowing)
        probs  = softmax(fp32(scores) * c, masked -65504)   in fp32, cast back to the compute dtype.
    q [b, n, s, d], k, v [b, g, s_k, d] (query head j uses key/value head j // (n / g)); mask [b, 1, s_q, s_k]
    bool (True = may attend) -> [b, n, s, d]."""
    b, n, s, d = q.shape
    g = k.shape[1]
    scale = math.sqrt(d) * layer_number
    q = q.view(b, g, n // g, s, d)  # [b, g, n/g, s, d]: the query heads of each key/value head
    scores = torch.matmul(q / scale, k.unsqueeze(2).transpose(-1, -2))  # [b, g, n/g, s_q, s_k]
    scores = (scores.to(torch.float32) * layer_number).masked_fill(~mask.unsqueeze(2), MASKED_SCORE)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(dropout(probs), v.unsqueeze(2)).flatten(1, 2)  # [b, n, s, d]


@functools.cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def flex_glm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                       layer_scaling: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), GLM mask) v by FlexAttention's fused kernel, skipping the tiles the mask hides.
    q [b, n, s, d], k, v [b, g, s, d] (grouped-query attention by the kernel's enable_gqa) -> [b, n, s, d].
    layer_scaling, c as a 0-dim tensor: GLM-130B's FP32 softmax with layer scaling (fp32_softmax_attention's
    formula): q / (sqrt(d) c) in the compute dtype, its scores with k taken in fp32 (the kernel's) and
    multiplied by c there before the fp32 softmax. A tensor, not an int, so that every block shares one
    compiled kernel instead of specialising on its layer number.
    Compiled on first use on an accelerator (traced with the block where the block is compiled); on CPU
    FlexAttention runs eagerly (the reference math) and has no backward, so training on CPU takes SDPA."""
    scale, score_mod = None, None
    if layer_scaling is not None:
        q = q / (layer_scaling.to(torch.float32) * math.sqrt(q.shape[-1]))  # q's dtype, as the eager formula
        scale = 1.0

        def score_mod(score, b, h, q_index, kv_index):
            return score * layer_scaling  # score is fp32 in the kernel; a 0-dim c does not lower it

    eager = q.device.type == "cpu" or torch.compiler.is_compiling()  # compiling: traced with the block
    kernel = flex_attention if eager else _compiled_flex_attention()
    return kernel(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  enable_gqa=k.shape[1] != q.shape[1])


AttentionMask = Optional[Union[torch.Tensor, BlockMask, CausalBias]]
"""The form of the mask a kernel takes (SelfAttention.kernel_mask, cached_mask): a dense [b, 1, s_q, s_k] bool mask
(True = may attend), SDPA's additive float mask [b, 1, s, s], FlexAttention's BlockMask, or for a KV-cached step
SDPA's lower-right causal bias or None (every query sees every key)."""


class KVCache:
    """Keys and values of earlier positions, [b, g, s_past, d] each (g key/value heads), for incremental decoding."""

    def __init__(self) -> None:
        self.key: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None

    def fork(self) -> "KVCache":
        """A cache holding the same positions, which later appends extend apart from this one (append builds new
        tensors, so the held ones are shared, not copied): several continuations of one cached prompt."""
        forked = KVCache()
        forked.key, forked.value = self.key, self.value
        return forked

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

    def __init__(self, config: ModelConfig, tp_group, init_method: Callable[[torch.Tensor], None],
                 sequence_parallel: bool = False):
        super().__init__(config.hidden_size, sum(config.qkv_rows), group=tp_group, bias=config.add_qkv_bias,
                         init_method=init_method, parts=config.qkv_rows, sequence_parallel=sequence_parallel)
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
        weight, bias = parts if len(parts) == 2 else (parts[0], None)
        return self.parallel_linear(x, weight, bias)  # the input's gradient summed, as super().forward's


class HeadNorm(nn.Module):
    """QK-norm: RMSNorm over each head's d dims, y = x / sqrt(mean(x^2) + eps) * g with one gain g [d] for
    every head (transformers' glm4_moe q_norm / k_norm); gain 1 at init."""

    def __init__(self, config: ModelConfig, tp_group=None):
        super().__init__()
        self.eps = config.layernorm_epsilon
        self.group = tp_group
        self.weight = nn.Parameter(torch.ones(config.head_dim))

    def split_rules(self) -> dict[str, SplitRule]:
        """Replicated: the gain is shared by the heads of every tensor-parallel rank."""
        return {"weight": REPLICATED}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, heads, d] -> the same shape; the gain's gradient summed over the tensor-parallel ranks, whose
        heads each hold part of it."""
        return rms_norm(x, copy_to_tp(self.weight, self.group), self.eps)


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention of block `layer_number` (1-based); each tensor-parallel
    rank computes num_attention_heads / tp whole heads and the row-parallel dense layer sums their
    contributions. With a cp_group the rank's tokens are its context-parallel chunks of each row."""

    def __init__(self, config: ModelConfig, layer_number: int, tp_group=None, seed: int = 0,
                 sequence_parallel: bool = False, cp_group=None):
        super().__init__()
        self.cp_group = cp_group
        h, n = config.hidden_size, config.num_layers
        tp = group_size(tp_group)
        q_rows, kv_rows, _ = config.qkv_rows
        self.config = config
        self.layer_number = layer_number
        self.local_heads = config.num_attention_heads // tp
        self.local_kv_heads = 1 if config.replicates_kv_heads(tp) else config.num_kv_heads // tp
        # c of the FP32-softmax switch for flex_glm_attention (None: off); not saved, it is the layer number
        scaling = torch.tensor(float(layer_number)) if config.fp32_softmax_layer_scaling else None
        self.register_buffer("layer_scaling", scaling, persistent=False)
        if config.norm == "deepnorm":  # DeepNet: q, k gain 1; v and the output projection gain beta
            qkv_stds = (xavier_normal_std(1.0, h, q_rows), xavier_normal_std(1.0, h, kv_rows),
                        xavier_normal_std(config.deepnorm_beta, h, kv_rows))
            dense_std = xavier_normal_std(config.deepnorm_beta, h, h)
        else:
            qkv_stds = (config.init_std,) * 3
            dense_std = config.init_std / math.sqrt(2 * n)
        name = f"layers.{layer_number - 1}.attention"
        self.query_key_value = QueryKeyValue(
            config, tp_group, fused_normal_init(seed, f"{name}.query_key_value", qkv_stds, config.qkv_rows),
            sequence_parallel)
        self.dense = RowParallelLinear(q_rows, h, group=tp_group, bias=config.add_bias_linear,
                                       sequence_parallel=sequence_parallel,
                                       init_method=normal_init(seed, f"{name}.dense", dense_std))
        if config.qk_norm:
            self.q_norm, self.k_norm = HeadNorm(config, tp_group), HeadNorm(config, tp_group)

    def forward(self, hidden: torch.Tensor, rotations: Rotations, mask: AttentionMask,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """hidden [b, s, h], the micro-batch's RoPE tables (trainer/model/rotary.py: position_rotations_of),
        mask in the form kernel_mask gives -> [b, s, h]. With a kv_cache, hidden holds only the new positions
        and the mask (dense) counts the cached ones too in s_k. Sequence-parallel: hidden and the output are
        this rank's tokens [b, s/tp, h] (query_key_value gathers the sequence, dense reduce-scatters it)."""
        d = self.config.head_dim
        heads = (self.local_heads, self.local_kv_heads, self.local_kv_heads)
        qkv = self.query_key_value(hidden)  # [b, s, (n/tp + 2 g_r) d], every token of the row
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, sum(heads), d)  # [b, s, n/tp + 2 g_r, d]
        q, k, v = qkv.split(heads, dim=2)  # [b, s, n/tp, d], [b, s, g_r, d] twice; g_r = g/tp, or 1 if replicated
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.config.position_embedding != "learned_2d":
            q, k = rotate(q, rotations, self.config), rotate(k, rotations, self.config)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads/tp, s, d]
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # [b, g_r, s_k, d]
        if self.cp_group is not None:  # s = this rank's s_row / cp tokens; keys and values of the whole row
            if kv_cache is not None:
                raise ValueError("context parallelism trains on whole rows: no KV cache")
            k, v = gather_row(k, self.cp_group, dim=2), gather_row(v, self.cp_group, dim=2)  # [b, g_r, s_row, d]
        p = self.config.attention_dropout if self.training else 0.0
        with get_rng_tracker().fork() if p > 0 else nullcontext():  # only dropout draws random numbers
            context = self._core(q, k, v, mask, p)  # [b, n/tp, s, d]
        context = context.transpose(1, 2).reshape(b, s, self.local_heads * d)  # [b, s, n d/tp]
        return self.dense(context)

    def kernel_mask(self, mask: GLMMask, dtype: torch.dtype) -> AttentionMask:
        """The form of the micro-batch's mask this block's kernel takes (module docstring), looked up in the
        mask's cache outside any compiled region: FlexAttention's BlockMask on an accelerator without attention
        dropout, else the dense bool mask (FP32-softmax formula) or SDPA's additive mask in `dtype`. With a
        cp_group, the rows of this rank's chunks against the whole row's keys (GLMMask.chunk)."""
        if self.cp_group is not None:
            mask = mask.chunk(group_size(self.cp_group), group_rank(self.cp_group))
        dropout = self.training and self.config.attention_dropout > 0
        if mask.segments.device.type != "cpu" and not dropout:
            return mask.block_mask()
        if self.config.fp32_softmax_layer_scaling:
            return mask.dense()
        return mask.additive(dtype)

    def cached_mask(self, mask: GLMMask, num_keys: int) -> AttentionMask:
        """The form of a KV-cached step's mask (its queries the last of num_keys positions): the dense bool rows
        for the eager FP32-softmax formula, else the smallest form SDPA takes (GLMMask.cached: none, a causal
        bias, or the dense rows only where neither is exact)."""
        if self.config.fp32_softmax_layer_scaling:
            return mask.dense(num_keys)
        return mask.cached(num_keys)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, p: float) -> torch.Tensor:
        """Scaled dot-product attention with dropout probability p on the probabilities; the kernel follows the
        mask's form (kernel_mask). q [b, n/tp, s, d], k, v [b, g_r, s_k, d] -> [b, n/tp, s, d]."""
        if isinstance(mask, BlockMask):
            return flex_glm_attention(q, k, v, mask, self.layer_scaling)
        if self.config.fp32_softmax_layer_scaling:
            return fp32_softmax_attention(q, k, v, mask, self.layer_number, lambda probs: F.dropout(probs, p))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=k.shape[1] != q.shape[1])
