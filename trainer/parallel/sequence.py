"""Megatron-LM sequence parallelism: the verbs that move activations between the sequence-parallel region and
the tensor-parallel one, and the gradient sum of the replicated parameters used in the former.

Hidden states are batch first, [b, s, h]; the sequence dimension is dim 1. With sequence parallelism each of
the p tensor-parallel ranks holds s/p tokens of every row, rank r tokens [r s/p, (r+1) s/p), in the regions
that are not tensor-parallel (the embedding output, dropout, residual adds, the norms):

    embedding  -reduce-scatter->  [b, s/p, h]  LN  -all-gather->  [b, s, h]  q/k/v ... attention out
    -reduce-scatter->  [b, s/p, h]  dropout + residual, LN  -all-gather->  MLP  -reduce-scatter->  ...
    final LN  [b, s/p, h]  -all-gather->  the output head and the loss on [b, s, h]
The all-gather before a column-parallel layer and the reduce-scatter after a row-parallel one replace the
identity / all-reduce pair of plain tensor parallelism (an all-reduce is a reduce-scatter then an all-gather), so
the communicated volume per block is the same and the activations between the two are 1/p the size.

Three tiers, as in mappings.py: primitives on the sequence dimension (the identity for one rank), private
autograd.Function pairs, public verbs whose docstring says "forward: X, backward: Y". `None` as the group
means no tensor parallelism: every verb is then the identity.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Optional

import torch
from torch import nn

from trainer.parallel.comm import Group, group_rank, group_size, sum_over_
from trainer.parallel.mappings import _gather_first_dim, _reduce_scatter_first_dim, conjugate_pair
from trainer.parallel.random import get_rng_tracker

SEQUENCE_DIM = 1
"""The sequence dimension of the hidden states [b, s, h]."""


# ---- primitives on the sequence dimension -------------------------------------------------------------

def _split_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's contiguous 1/p of the tokens: [b, s, h] -> [b, s/p, h]."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[SEQUENCE_DIM] % size != 0:
        raise ValueError(f"sequence length {x.shape[SEQUENCE_DIM]} is not divisible by the tensor-parallel size {size}")
    return x.chunk(size, dim=SEQUENCE_DIM)[group_rank(group)].contiguous()


def _gather_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Every rank's tokens in rank order: [b, s/p, h] -> [b, s, h]."""
    if group_size(group) == 1:
        return x
    gathered = _gather_first_dim(x.transpose(0, SEQUENCE_DIM), group)  # [s, b, h]
    return gathered.transpose(0, SEQUENCE_DIM).contiguous()  # [b, s, h]


def _reduce_scatter_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """sum_r x_r over the group, this rank's 1/p of the tokens kept: [b, s, h] -> [b, s/p, h]."""
    if group_size(group) == 1:
        return x
    if x.shape[SEQUENCE_DIM] % group_size(group) != 0:
        raise ValueError(f"sequence length {x.shape[SEQUENCE_DIM]} is not divisible by the tensor-parallel size "
                         f"{group_size(group)}")
    part = _reduce_scatter_first_dim(x.transpose(0, SEQUENCE_DIM), group)  # [s/p, b, h]
    return part.transpose(0, SEQUENCE_DIM).contiguous()  # [b, s/p, h]


# ---- autograd pairs -----------------------------------------------------------------------------------

_ScatterToSequence = conjugate_pair(_split_sequence, _gather_sequence, "_ScatterToSequence")
_GatherFromSequence = conjugate_pair(_gather_sequence, _split_sequence, "_GatherFromSequence")
_ReduceScatterToSequence = conjugate_pair(_reduce_scatter_sequence, _gather_sequence, "_ReduceScatterToSequence")


class _LinearGatheredSequence(torch.autograd.Function):
    """y = gather_s(x) W^T + b that saves this rank's tokens x, not the gathered input: backward all-gathers x
    again for W's gradient (Megatron's linear with sequence parallelism), so a column-parallel layer keeps
    s/p tokens of its input for backward instead of all s."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias, group: Group) -> torch.Tensor:
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(_gather_sequence(x, group), weight, bias)  # [b, s, out/p]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        gathered = _gather_sequence(x, ctx.group)  # [b, s, in]
        grad_x = _reduce_scatter_sequence(grad.matmul(weight), ctx.group)  # [b, s/p, in], summed over the group
        grad_weight = grad.flatten(0, -2).t().matmul(gathered.flatten(0, -2))  # [out/p, in]
        grad_bias = grad.flatten(0, -2).sum(dim=0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None


# ---- public verbs -------------------------------------------------------------------------------------

def scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: keep this rank's s/p tokens of a replicated [b, s, h], backward: all-gather the gradient along s."""
    return x if group is None else _ScatterToSequence.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: all-gather along s, [b, s/p, h] -> [b, s, h], backward: keep this rank's s/p tokens of the gradient.
    For a consumer whose gradient is already whole on every rank (the output head: the logits' copy_to_tp sums
    it over the vocabulary shards)."""
    return x if group is None else _GatherFromSequence.apply(x, group)


def linear_gathered_sequence(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             group: Group) -> torch.Tensor:
    """forward: all-gather x [b, s/p, in] along s and y = x W^T + b [b, s, out/p], backward: the input's gradient
    reduce-scattered along s (each rank's is partial: its own output columns only), x gathered again for W's gradient rather than kept
    whole. The column-parallel layers' product under sequence parallelism."""
    if group is None:
        return torch.nn.functional.linear(x, weight, bias)
    return _LinearGatheredSequence.apply(x, weight, bias, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: reduce-scatter along s, [b, s, h] -> [b, s/p, h] summed over the group, backward: all-gather the
    gradient along s. Leaves a row-parallel layer (or the vocabulary-parallel embedding) in place of
    reduce_from_tp."""
    return x if group is None else _ReduceScatterToSequence.apply(x, group)


# ---- the replicated parameters of the region, and its dropout -----------------------------------------

def sum_grad_over_tp_(param: nn.Parameter, group: Group) -> nn.Parameter:
    """Mark a replicated parameter used in the sequence-parallel region (a norm's gain and bias, a row-parallel
    bias): each rank's gradient covers only its s/p tokens, so the gradient is summed over the group as autograd
    computes it, before it is accumulated into .grad (Megatron marks such parameters `sequence_parallel` and
    all-reduces their gradients over tp before the optimizer step). Summing in backward, per micro-batch, keeps
    the sum ahead of whatever the engine does next with .grad: DeepSpeed's data-parallel reduction (which
    ZeRO-1/2/3 run in backward hooks of their own, moving gradients into partitions), the gradient norm,
    clipping. Cost: one all-reduce of the parameter's size per micro-batch (h numbers; 4-6 per block)."""
    param.sequence_parallel = True
    if group_size(group) > 1:
        param.register_hook(lambda grad: sum_over_(grad.clone(), group))
    return param


def region_rng(sequence_parallel: bool) -> ContextManager:
    """The RNG stream of dropout on the hidden states: with sequence parallelism each rank holds different tokens,
    so it draws from its own (tensor-rank) stream, as Megatron does; without, every rank holds the same tensor and
    draws the same mask from the shared default stream (trainer/parallel/random.py)."""
    return get_rng_tracker().fork() if sequence_parallel else nullcontext()
