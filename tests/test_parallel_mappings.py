"""The tensor-parallel verbs on 2 gloo ranks, forward and backward, against the single-process math."""
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from trainer.parallel.mappings import (copy_to_tp, gather_from_tp, gather_rows_from_tp, group_rank, group_size,
                                       reduce_from_tp, scatter_to_tp)

SHAPE = (2, 3, 4)  # [b, s, h]


def _tensors(count: int) -> list[torch.Tensor]:
    """The same deterministic tensors on every rank."""
    generator = torch.Generator().manual_seed(1234)
    return [torch.randn(SHAPE, generator=generator) for _ in range(count)]


def _check_copy(rank: int, group) -> None:
    x, w0, w1 = _tensors(3)
    x = x.clone().requires_grad_()
    y = copy_to_tp(x, group)
    torch.testing.assert_close(y, x)
    (y * (w0, w1)[rank]).sum().backward()
    torch.testing.assert_close(x.grad, w0 + w1)  # backward: all-reduce


def _check_reduce(rank: int, group) -> None:
    x0, x1, w = _tensors(3)
    x = (x0, x1)[rank].clone().requires_grad_()
    y = reduce_from_tp(x, group)
    torch.testing.assert_close(y, x0 + x1)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w)  # backward: identity
    torch.testing.assert_close(x, (x0, x1)[rank])  # the input is not reduced in place


def _check_scatter(rank: int, group) -> None:
    x, w = _tensors(2)
    x = x.clone().requires_grad_()
    y = scatter_to_tp(x, group)
    torch.testing.assert_close(y, x.detach()[..., 2 * rank:2 * rank + 2])
    w_r = w[..., 2 * rank:2 * rank + 2]
    (y * w_r).sum().backward()
    torch.testing.assert_close(x.grad, w)  # backward: all-gather of both ranks' slices


def _check_gather(rank: int, group) -> None:
    x0, x1, w = _tensors(3)
    x = (x0, x1)[rank].clone().requires_grad_()
    y = gather_from_tp(x, group)
    torch.testing.assert_close(y, torch.cat([x0, x1], dim=-1))
    w = torch.cat([w, 2 * w], dim=-1)  # [b, s, 2h]
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w[..., SHAPE[-1] * rank:SHAPE[-1] * (rank + 1)])  # backward: split


def _check_gather_rows(rank: int, group) -> None:
    x0, x1, w0, w1 = _tensors(4)
    x = (x0, x1)[rank].clone().requires_grad_()
    y = gather_rows_from_tp(x, group)
    torch.testing.assert_close(y, torch.cat([x0, x1], dim=0))
    w = (w0, w1)[rank]
    (y * torch.cat([w, 2 * w])).sum().backward()  # each rank's own (partial) gradient of the whole
    torch.testing.assert_close(x.grad, (rank + 1) * (w0 + w1))  # backward: its rows of the summed gradient


def _all_verbs(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=list(range(world_size)))
    assert group_size(group) == 2 and group_rank(group) == rank
    _check_copy(rank, group)
    _check_reduce(rank, group)
    _check_scatter(rank, group)
    _check_gather(rank, group)
    _check_gather_rows(rank, group)


def test_verbs_forward_and_backward_on_two_ranks():
    run_distributed(_all_verbs, 2)


def test_no_group_is_identity():
    x, w = _tensors(2)
    assert group_size(None) == 1 and group_rank(None) == 0
    for verb in (copy_to_tp, reduce_from_tp, scatter_to_tp, gather_from_tp, gather_rows_from_tp):
        leaf = x.clone().requires_grad_()
        y = verb(leaf, None)
        torch.testing.assert_close(y, x)
        (y * w).sum().backward()
        torch.testing.assert_close(leaf.grad, w)
