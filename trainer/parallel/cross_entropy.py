"""Cross entropy over vocabulary-parallel logits, in fp32, without gathering the full vocabulary.

Rank r holds logits z[..., v] for v in [vocab_start, vocab_start + V/p). For a token with label t:
    m = max_v z_v,    loss = log sum_v exp(z_v - m) - (z_t - m),    dloss/dz_v = softmax(z)_v - [v == t]
Each rank computes its partial max, partial sum and (if t is its own) the target logit; the max and the
two sums are all-reduced over the tensor-parallel group. Columns v >= vocab_size (vocabulary padding)
get z_v = -inf, so they take no part in the softmax and receive zero gradient.

The math is in pure functions of one partition (no communication, testable by combining partitions by
hand); `vocab_parallel_cross_entropy` is the thin autograd wrapper that adds the collectives.

`vocab_parallel_linear_cross_entropy` is the loss's form: the output layer's matrix multiply and the cross
entropy fused, over chunks of CHUNK_ELEMENTS logits, so the fp32 logits of all tokens [n, V/p] never exist at
once (only a chunk's). Its value is the mask-weighted sum of the per-token losses, a scalar, so each chunk's
gradients (dL/dhidden, dL/dW) are computed in the forward, while its logits are at hand, and the backward
only scales them by the incoming gradient (no second pass over the vocabulary).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.parallel.mappings import Group, copy_to_tp, group_rank, group_size

CHUNK_ELEMENTS = 1 << 25
"""fp32 logits per chunk of vocab_parallel_linear_cross_entropy (128 MiB; 667 rows of GLM-1.3B's 50304)."""


def mask_padded_columns(logits: torch.Tensor, vocab_start: int, vocab_size: Optional[int]) -> torch.Tensor:
    """z_v = -inf for the global columns v >= vocab_size; logits [b, s, V/p] fp32."""
    if vocab_size is None or vocab_start + logits.shape[-1] <= vocab_size:
        return logits
    columns = torch.arange(vocab_start, vocab_start + logits.shape[-1], device=logits.device)
    return logits.masked_fill(columns >= vocab_size, float("-inf"))


def partition_max(logits: torch.Tensor) -> torch.Tensor:
    """max_v z_v over this partition: [b, s, V/p] -> [b, s]."""
    return logits.max(dim=-1).values


def partition_statistics(logits: torch.Tensor, labels: torch.Tensor, logits_max: torch.Tensor,
                         vocab_start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """With the global max m [b, s]: exp(z - m) [b, s, V/p], its partition sum [b, s], and z_t - m [b, s]
    where the label t falls in this partition (0 elsewhere, so summing over partitions gives z_t - m)."""
    shifted = logits - logits_max.unsqueeze(-1)  # [b, s, V/p]
    exp_logits = shifted.exp()
    local_labels = labels - vocab_start
    owned = (local_labels >= 0) & (local_labels < logits.shape[-1])
    picked = shifted.gather(-1, local_labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return exp_logits, exp_logits.sum(dim=-1), picked.masked_fill(~owned, 0.0)


def loss_from_statistics(sum_exp: torch.Tensor, target_shifted: torch.Tensor) -> torch.Tensor:
    """loss = log sum_v exp(z_v - m) - (z_t - m), per token [b, s]."""
    return sum_exp.log() - target_shifted


def logits_gradient(exp_logits: torch.Tensor, sum_exp: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                    grad_loss: torch.Tensor) -> torch.Tensor:
    """dL/dz_v = (softmax_v - [v == t]) * dL/dloss for this partition's columns: [b, s, V/p]."""
    grad = exp_logits / sum_exp.unsqueeze(-1)  # softmax, [b, s, V/p]
    local_labels = labels - vocab_start
    owned = (local_labels >= 0) & (local_labels < exp_logits.shape[-1])
    one_hot = torch.zeros_like(grad).scatter_(-1, local_labels.clamp(0, grad.shape[-1] - 1).unsqueeze(-1),
                                              owned.unsqueeze(-1).to(grad.dtype))
    return (grad - one_hot) * grad_loss.unsqueeze(-1)


def _all_reduce_(x: torch.Tensor, op: dist.ReduceOp, group: Group) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group: Group,
                vocab_size: Optional[int]) -> torch.Tensor:
        vocab_start = group_rank(group) * logits.shape[-1]
        ctx.logits_dtype = logits.dtype
        logits = mask_padded_columns(logits.float(), vocab_start, vocab_size)
        logits_max = _all_reduce_(partition_max(logits), dist.ReduceOp.MAX, group)
        exp_logits, sum_exp, target = partition_statistics(logits, labels, logits_max, vocab_start)
        sums = _all_reduce_(torch.stack([sum_exp, target]), dist.ReduceOp.SUM, group)  # [2, b, s]
        ctx.vocab_start = vocab_start
        ctx.save_for_backward(exp_logits, sums[0], labels)
        return loss_from_statistics(sums[0], sums[1])

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        exp_logits, sum_exp, labels = ctx.saved_tensors
        grad = logits_gradient(exp_logits, sum_exp, labels, ctx.vocab_start, grad_loss.float())
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group: Group,
                                 vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token fp32 cross entropy: logits [b, s, V/p] (this rank's vocabulary slice, rank-ordered),
    labels [b, s] global ids -> loss [b, s]. Columns >= vocab_size (padding) are left out of the softmax."""
    if group_size(group) == 1:
        # One partition holds the whole vocabulary: PyTorch's fused log-softmax + NLL is the same math in
        # fewer passes over the [.., V] logits.
        logits = logits if vocab_size is None else logits[..., :vocab_size]
        per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return per_token.view(labels.shape)
    return _VocabParallelCrossEntropy.apply(logits, labels, group, vocab_size)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, group: Group,
                vocab_start: int, vocab_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of rows: (per-token loss [c], exp(z - m) [c, V/p] and the summed exp [c] for its gradient)."""
    logits = mask_padded_columns(F.linear(hidden, weight).float(), vocab_start, vocab_size)  # [c, V/p]
    logits_max = _all_reduce_(partition_max(logits), dist.ReduceOp.MAX, group)
    exp_logits, sum_exp, target = partition_statistics(logits, labels, logits_max, vocab_start)
    sums = _all_reduce_(torch.stack([sum_exp, target]), dist.ReduceOp.SUM, group)  # [2, c]
    return loss_from_statistics(sums[0], sums[1]), exp_logits, sums[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor,
                group: Group, vocab_size: Optional[int]) -> torch.Tensor:
        vocab_start = group_rank(group) * weight.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None  # [n, h]
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None  # [V/p, h]
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            loss, exp_logits, sum_exp = _chunk_loss(hidden[chunk], weight, labels[chunk], group, vocab_start,
                                                    vocab_size)
            total += (loss * token_weights[chunk]).sum()
            if want_hidden or want_weight:
                grad = logits_gradient(exp_logits, sum_exp, labels[chunk], vocab_start,
                                       token_weights[chunk]).to(weight.dtype)  # [c, V/p]
                if want_hidden:
                    grad_hidden[chunk] = grad @ weight  # this vocabulary shard's part: summed by copy_to_tp
                if want_weight:
                    grad_weight += grad.t() @ hidden[chunk]  # [V/p, h], summed over chunks in fp32
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.float()
        grad_hidden = None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                        token_weights: torch.Tensor, group: Group,
                                        vocab_size: Optional[int] = None) -> torch.Tensor:
    """sum_i token_weights_i * CE(hidden_i W^T, labels_i), a 0-dim fp32 tensor: hidden [n, h] (replicated over
    the group), weight [V/p, h] (this rank's vocabulary rows), labels [n] global ids, token_weights [n] fp32.
    The same loss as vocab_parallel_cross_entropy of F.linear(hidden, weight), chunked (module docstring)."""
    return _LinearCrossEntropy.apply(copy_to_tp(hidden, group), weight, labels, token_weights.float(), group,
                                     vocab_size)


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """sum(l * m) / sum(m) over all tokens; 0 (not nan) when the mask is empty."""
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(torch.finfo(per_token.dtype).tiny)
