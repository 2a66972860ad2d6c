"""The collectives of the training loop around the model: reductions of numbers (a loss, a gradient norm, a
stop flag), barriers and one object broadcast; and the two all-to-all primitives of expert parallelism
(expert_dispatch.py wraps them in autograd). The model's own tensor-parallel communication, with its autograd,
is mappings.py; process groups come from topology.py.

Every verb takes its process group explicitly. As in mappings.py, a `None` group means one rank (no
torch.distributed, or an axis of size 1) and every verb is then the identity; `world_group()` is the group of
every rank in those terms.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    """Number of ranks in the group; 1 for `None`."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This process's rank inside the group; 0 for `None`."""
    return 0 if group is None else dist.get_rank(group)


def world_group() -> Group:
    """Every rank of the run; None when torch.distributed is not started or has one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.group.WORLD


def global_rank() -> int:
    """This process's rank in the run; 0 when torch.distributed is not started."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def sum_over_(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """In place: tensor <- sum_r tensor_r over the group's ranks; returns it."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def mean_over_(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """In place: tensor <- (1/n) sum_r tensor_r over the group's n ranks; returns it."""
    size = group_size(group)
    if size > 1:
        dist.all_reduce(tensor, group=group)
        tensor /= size
    return tensor


def sum_count(count: int, group: Group) -> int:
    """The sum of an integer over the group's ranks (e.g. a step's loss tokens over the data-parallel ranks),
    read back on the host."""
    if group_size(group) == 1:
        return count
    total = torch.tensor([count], dtype=torch.long, device=get_accelerator().current_device_name())
    dist.all_reduce(total, group=group)
    return int(total.item())


def any_rank(flag: bool, device: torch.device | str, group: Group) -> bool:
    """True on every rank of the group if it is True on any of them (a collective: every rank calls it)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if group_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def max_over_ranks(flag: bool, device: torch.device | str, group: Group) -> torch.Tensor:
    """any_rank without the host read: a 0-dim tensor on `device`, 1.0 on every rank of the group if the flag
    is True on any of them, else 0.0 (a collective: every rank calls it)."""
    value = torch.tensor(1.0 if flag else 0.0, device=device)
    if group_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value


def barrier(group: Group) -> None:
    """Wait until every rank of the group reaches this call."""
    if group_size(group) > 1:
        dist.barrier(group=group)


def broadcast_object(value: Any, group: Group) -> Any:
    """The value of the group's first rank, on every rank of the group (any picklable object)."""
    if group_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def all_to_all_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """counts [p, n] (row q: what this rank sends to the group's rank q) -> [p, n] (row q: what rank q sends to
    this one): the exchange of split sizes before an all-to-all of variable splits."""
    if group_size(group) == 1:
        return counts
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received


def all_to_all_rows(rows: torch.Tensor, send_splits: list[int], receive_splits: list[int],
                    group: Group) -> torch.Tensor:
    """rows [sum(send_splits), ...], the group's rank q getting the q-th block of send_splits[q] rows ->
    [sum(receive_splits), ...], rank q's block for this rank in the q-th place (receive_splits[q] rows); a new
    tensor. No autograd (expert_dispatch.py adds it: the backward is the same exchange, splits swapped)."""
    if group_size(group) == 1:
        return rows.clone()
    received = rows.new_empty(sum(receive_splits), *rows.shape[1:])
    dist.all_to_all_single(received, rows.contiguous(), output_split_sizes=receive_splits,
                           input_split_sizes=send_splits, group=group)
    return received
