"""Tensor-parallel communication verbs, each an autograd function with its conjugate in backward.

Three tiers, as in Megatron-LM: primitives that talk to torch.distributed (and return early when the
group has one rank), private autograd.Function pairs, and the public verbs the model calls. Every verb
takes its process group explicitly; a `None` group means "no tensor parallelism" and every verb is then
the identity (group_size and group_rank are comm.py's). Scatter and gather act on the last dimension (the
hidden or vocabulary dimension); gathering rows acts on the first (the rows of a weight split over the
ranks that every rank uses whole).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from trainer.parallel.comm import Group, group_rank, group_size


# ---- primitives -------------------------------------------------------------------------------------

def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """sum_r x_r over the group, into a new tensor (x is left untouched for autograd's saved tensors)."""
    if group_size(group) == 1:
        return x
    total = x.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total


def _split_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's contiguous 1/p of the last dimension: [..., n] -> [..., n/p]."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[-1] % size != 0:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {size}")
    return x.chunk(size, dim=-1)[group_rank(group)].contiguous()


def _gather_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's x on the last dimension, in rank order: [..., n/p] -> [..., n]."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def _gather_first_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's x on the first dimension, in rank order: [n/p, ...] -> [n, ...]."""
    size = group_size(group)
    if size == 1:
        return x
    gathered = x.new_empty(size * x.shape[0], *x.shape[1:])
    dist.all_gather_into_tensor(gathered, x.contiguous(), group=group)
    return gathered


def _reduce_scatter_first_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """sum_r x_r over the group, this rank's contiguous 1/p of the first dimension kept: [n, ...] -> [n/p, ...]."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[0] % size != 0:
        raise ValueError(f"first dimension {x.shape[0]} is not divisible by the tensor-parallel size {size}")
    part = x.new_empty(x.shape[0] // size, *x.shape[1:])
    dist.reduce_scatter_tensor(part, x.contiguous(), group=group)
    return part


# ---- autograd pairs ---------------------------------------------------------------------------------

Collective = Callable[[torch.Tensor, Group], torch.Tensor]


def _identity(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x


def conjugate_pair(forward: Collective, backward: Collective, name: str) -> type[torch.autograd.Function]:
    """The autograd function `name`: forward(x, group) in forward, backward(grad, group) in backward."""

    def run_forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return forward(x, group)

    def run_backward(ctx, grad: torch.Tensor):
        return backward(grad, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run_forward),
                                                  "backward": staticmethod(run_backward)})


_CopyToTP = conjugate_pair(_identity, _all_reduce, "_CopyToTP")
_ReduceFromTP = conjugate_pair(_all_reduce, _identity, "_ReduceFromTP")
_ScatterToTP = conjugate_pair(_split_last_dim, _gather_last_dim, "_ScatterToTP")
_GatherFromTP = conjugate_pair(_gather_last_dim, _split_last_dim, "_GatherFromTP")
_GatherRowsFromTP = conjugate_pair(_gather_first_dim, _reduce_scatter_first_dim, "_GatherRowsFromTP")


# ---- public verbs -----------------------------------------------------------------------------------
# Without tensor parallelism (group None) each verb returns its input: no autograd node either.

def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: identity, backward: all-reduce (sum) of the gradient over the group."""
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: all-reduce (sum) over the group, backward: identity."""
    return x if group is None else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: keep this rank's slice of the last dim, backward: all-gather the gradient on the last dim."""
    return x if group is None else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: all-gather on the last dim (rank order), backward: keep this rank's slice of the gradient."""
    return x if group is None else _GatherFromTP.apply(x, group)


def gather_rows_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: all-gather on dim 0 (rank order), backward: reduce-scatter on dim 0 (the gradient summed over the
    group, this rank's rows kept). For a weight whose rows are split over the ranks and which every rank uses
    whole: each rank's gradient of the gathered weight is partial (only its own computation contributes)."""
    return x if group is None else _GatherRowsFromTP.apply(x, group)
