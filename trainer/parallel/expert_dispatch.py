"""Expert parallelism's token exchange: each token's k routed copies go to the ranks that hold their experts
(dispatch) and come back, weighted and summed per token (combine), as in GShard / Megatron-LM's all-to-all
token dispatcher, dropless.

The experts of an MoE layer are split over the ep group in contiguous blocks: rank r of p holds the global
experts [r E/p, (r+1) E/p) (docs/ARCHITECTURE.md, the MoE contract). For T tokens with k experts each:

    dispatch   the T k (token, expert) slots sorted by global expert (stable: token order within an expert),
               which groups them by destination rank; the per-expert counts exchanged first (all-to-all of
               a [p, E/p] table), then the rows (all_to_all_single with variable splits); the rows received
               (by source rank, then local expert) regrouped by local expert, source order kept.
    combine    the exact inverse permutations and the reverse exchange, then y_t = sum_j w_tj * out_(t, j).

At ep = 1 both exchanges are the identity and dispatch is the local permutation by expert. The all-to-all
is autograd-correct: its backward is the reverse all-to-all (the splits swapped), so input gradients equal the
single-process computation's. Collectives go through comm.py's verbs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from torch import nn

from trainer.parallel.comm import Group, all_to_all_counts, all_to_all_rows, group_rank, group_size


class _AllToAll(torch.autograd.Function):
    """forward: rows exchanged with send / receive splits; backward: the gradient exchanged back (splits
    swapped)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], receive: list[int], group: Group) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return all_to_all_rows(rows, send, receive, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_to_all_rows(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def _exchange(rows: torch.Tensor, send: list[int], receive: list[int], group: Group) -> torch.Tensor:
    """forward: the all-to-all of rows; backward: the reverse all-to-all. The identity on one rank."""
    if group_size(group) == 1:
        return rows
    return _AllToAll.apply(rows, send, receive, group)


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation of arange(n): inverse[permutation[i]] = i."""
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel(), device=permutation.device)
    return inverse


@dataclass
class DispatchHandle:
    """What combine needs to undo a dispatch."""
    order: torch.Tensor
    """[T k] the slots (t k + j) sorted by global expert: the send order."""
    send: list[int]
    """Rows sent to each rank of the ep group."""
    receive: list[int]
    """Rows received from each rank of the ep group."""
    regroup: torch.Tensor
    """[N] the received rows' positions in local-expert order (the rows arrive by source rank)."""
    top_k: int
    group: Group


def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
             ep_group: Group) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
    """x [T, h], topk_ids [T, k] (global expert ids) -> (rows [N, h] for this rank's E/p experts, grouped by
    local expert; counts [E/p] int64, the rows of each local expert; the handle for combine)."""
    ranks = group_size(ep_group)
    if num_experts % ranks:
        raise ValueError(f"{num_experts} experts do not split over {ranks} expert-parallel ranks")
    local = num_experts // ranks
    top_k = topk_ids.shape[1]
    slots = topk_ids.reshape(-1)  # [T k]: slot t k + j is token t's j-th expert
    order = torch.argsort(slots, stable=True)
    routed = x.index_select(0, order // top_k)  # [T k, h], grouped by expert, so by destination rank
    counts = torch.bincount(slots, minlength=num_experts).view(ranks, local)  # [p, E/p]: to rank q, per its expert
    if ranks == 1:
        handle = DispatchHandle(order, [slots.numel()], [slots.numel()], order.new_empty(0), top_k, ep_group)
        return routed, counts[0], handle
    received_counts = all_to_all_counts(counts, ep_group)  # [p, E/p]: from rank q, per local expert
    send, receive = counts.sum(1).tolist(), received_counts.sum(1).tolist()
    received = _exchange(routed, send, receive, ep_group)  # [N, h] by source rank, then local expert
    expert_of_row = torch.arange(local, device=slots.device).repeat(ranks).repeat_interleave(
        received_counts.reshape(-1))  # [N]
    regroup = torch.argsort(expert_of_row, stable=True)
    handle = DispatchHandle(order, send, receive, regroup, top_k, ep_group)
    return received.index_select(0, regroup), received_counts.sum(0), handle


def combine(expert_out: torch.Tensor, topk_weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """expert_out [N, h] (dispatch's rows after the experts) and topk_weights [T, k] -> [T, h]: every token's
    k expert outputs back on its rank, y_t = sum_j w_tj out_tj (summed in fp32 and cast to expert_out's
    dtype)."""
    routed = expert_out  # [T k, h] in send order at ep = 1
    if group_size(handle.group) > 1:
        received = expert_out.index_select(0, _inverse(handle.regroup))  # [N, h] by source rank again
        routed = _exchange(received, handle.receive, handle.send, handle.group)  # [T k, h] in send order
    slots = routed.index_select(0, _inverse(handle.order))  # [T k, h] in slot order
    tokens, top_k = topk_weights.shape
    per_slot = slots.view(tokens, top_k, -1).float() * topk_weights.unsqueeze(-1).float()  # [T, k, h]
    return per_slot.sum(1).to(expert_out.dtype)


def local_experts(experts: nn.Parameter, ep_group: Group) -> nn.Parameter:
    """A weight of all E experts on dim 0 -> this rank's contiguous block of E / ep (the same parameter at ep = 1),
    keeping its tensor-parallel mark."""
    ranks = group_size(ep_group)
    if ranks == 1:
        return experts
    if experts.shape[0] % ranks:
        raise ValueError(f"{experts.shape[0]} experts do not split over {ranks} expert-parallel ranks")
    block = nn.Parameter(experts.detach().chunk(ranks, dim=0)[group_rank(ep_group)].clone())
    block.tensor_model_parallel = getattr(experts, "tensor_model_parallel", False)
    return block
