"""The loop's collectives (trainer/parallel/comm.py): identities without process groups, and the reduced values
on 2 gloo ranks."""
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from trainer.parallel.comm import (any_rank, barrier, broadcast_object, global_rank, group_rank, group_size,
                                   mean_over_, sum_over_, world_group)


def test_without_process_groups_every_verb_is_the_identity(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # as in a process that never started one
    assert world_group() is None and global_rank() == 0 and group_size(None) == 1 and group_rank(None) == 0
    x = torch.tensor([1.5, -2.0])
    assert sum_over_(x, None) is x and torch.equal(x, torch.tensor([1.5, -2.0]))
    assert mean_over_(x, None) is x and torch.equal(x, torch.tensor([1.5, -2.0]))
    assert any_rank(True, "cpu", None) and not any_rank(False, "cpu", None)
    assert broadcast_object({"tag": 3}, None) == {"tag": 3}
    barrier(None)


def _two_ranks(rank: int, world_size: int) -> None:
    world = world_group()
    assert world is not None and group_size(world) == 2 and group_rank(world) == rank == global_rank()
    total = sum_over_(torch.tensor([1.0 + rank, 10.0 * rank]), world)
    torch.testing.assert_close(total, torch.tensor([3.0, 10.0]))
    mean = mean_over_(torch.tensor([1.0 + rank]), world)
    torch.testing.assert_close(mean, torch.tensor([1.5]))
    assert any_rank(rank == 1, "cpu", world) and not any_rank(False, "cpu", world)
    assert broadcast_object(f"from rank {rank}", world) == "from rank 0"
    barrier(world)


def test_two_ranks_reduce_and_broadcast():
    run_distributed(_two_ranks, 2)
