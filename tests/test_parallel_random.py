"""The model-parallel RNG: dropout masks identical across tensor ranks on the default stream and different
under fork(); state save/restore; recompute() replays the forward's dropout masks."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from tests.distributed import run_distributed
from trainer.parallel.mesh import Layout
from trainer.parallel.random import (RNGStatesTracker, get_rng_states, get_rng_tracker,
                                     model_parallel_seed, recompute, set_rng_states)
from trainer.parallel.topology import Topology

SHAPE = (4, 8, 16)  # [b, s, h]


def _dropout_mask() -> torch.Tensor:
    return F.dropout(torch.ones(SHAPE), p=0.5) != 0


def _gather(mask: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mask.to(torch.uint8))
    return parts


def _masks_across_tensor_ranks(rank: int, world_size: int) -> None:
    topology = Topology.create(tp=2, pp=1)
    model_parallel_seed(1234, topology)
    replicated = _dropout_mask()
    with get_rng_tracker().fork():
        partitioned = _dropout_mask()
    after_fork = _dropout_mask()
    for name, mask, same in (("default", replicated, True), ("fork", partitioned, False),
                             ("default after fork", after_fork, True)):
        first, second = _gather(mask)
        assert torch.equal(first, second) == same, f"{name} stream: masks equal across tp ranks != {same}"


def test_masks_identical_on_default_stream_and_independent_under_fork():
    run_distributed(_masks_across_tensor_ranks, 2)


def test_fork_does_not_touch_the_default_stream():
    model_parallel_seed(7, Topology.single())
    expected = [_dropout_mask(), _dropout_mask()]
    model_parallel_seed(7, Topology.single())
    first = _dropout_mask()
    with get_rng_tracker().fork():
        forked = _dropout_mask()
    assert torch.equal(first, expected[0]) and torch.equal(_dropout_mask(), expected[1])
    assert not torch.equal(forked, expected[1])


def test_seeds_differ_by_pipeline_stage_and_tensor_rank():
    masks = {}  # (tp_rank, pp_rank) -> (default-stream mask, forked mask)
    for tp_rank, pp_rank in ((0, 0), (1, 0), (0, 1)):
        model_parallel_seed(7, Topology(Layout(tp=2, pp=2, dp=1), rank=pp_rank * 2 + tp_rank))
        default = _dropout_mask()
        with get_rng_tracker().fork():
            masks[tp_rank, pp_rank] = (default, _dropout_mask())
    assert torch.equal(masks[0, 0][0], masks[1, 0][0])  # default stream: same stage, same mask
    assert not torch.equal(masks[0, 0][0], masks[0, 1][0])  # another stage draws other masks
    assert not torch.equal(masks[0, 0][1], masks[1, 0][1])  # fork: every tensor rank its own


def test_states_round_trip():
    model_parallel_seed(3, Topology.single())
    states = get_rng_states()
    with get_rng_tracker().fork():
        forked = _dropout_mask()
    default = _dropout_mask()
    set_rng_states(states)
    with get_rng_tracker().fork():
        assert torch.equal(_dropout_mask(), forked)
    assert torch.equal(_dropout_mask(), default)


def test_tracker_errors_name_the_fix():
    tracker = RNGStatesTracker()
    with pytest.raises(RuntimeError, match="model_parallel_seed"):
        with tracker.fork():
            pass
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)


def _block(x: torch.Tensor, position_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Dropout on both streams around a matmul; position_ids stands for the integer tensors that travel
    with the hidden states between pipeline stages."""
    h = F.dropout(x @ weight, p=0.5)  # replicated activation: default stream
    with get_rng_tracker().fork():
        h = F.dropout(torch.tanh(h), p=0.5)  # partitioned region: tracker stream
    return (h @ weight) * position_ids.unsqueeze(-1)


def _gradients(run, x_requires_grad: bool):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=generator).requires_grad_(x_requires_grad)
    weight = torch.randn(SHAPE[-1], SHAPE[-1], generator=generator).requires_grad_()
    position_ids = torch.arange(SHAPE[1]).expand(SHAPE[0], -1)  # [b, s]
    model_parallel_seed(11, Topology.single())
    out = run(_block, x, position_ids, weight)
    out = out + run(_block, out, position_ids, weight)  # two recomputed segments in a row
    out.square().sum().backward()
    return out.detach(), weight.grad, x.grad


@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_recompute_reproduces_dropout_masks(x_requires_grad):
    torch.set_num_threads(1)
    plain = _gradients(lambda fn, *args: fn(*args), x_requires_grad)
    recomputed = _gradients(recompute, x_requires_grad)
    for expected, actual in zip(plain, recomputed):
        torch.testing.assert_close(actual, expected)
    # Without replaying the tracker the forked masks differ in the recomputation: the replay is what matters.
    bare = _gradients(lambda fn, *args: torch_checkpoint(fn, *args, use_reentrant=False), x_requires_grad)
    assert not torch.allclose(bare[1], plain[1])
