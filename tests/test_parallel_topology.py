"""The topology agrees with DeepSpeed's PipeModelDataParallelTopology (coordinates and every group), checked
by arithmetic for several layouts, and builds working process groups on 4 gloo ranks."""
import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from tests.distributed import run_distributed
from trainer.errors import ConfigError
from trainer.parallel.topology import AXES, Topology, coordinates, data_parallel_size, group_ranks

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2), (4, 3, 2),
           (2, 4, 3)]  # (tp, pp, dp)
DS_AXIS = {"tensor": "model", "pipe": "pipe", "data": "data"}


@pytest.mark.parametrize("tp, pp, dp", LAYOUTS)
def test_coordinates_match_deepspeed(tp, pp, dp):
    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for rank in range(tp * pp * dp):
        coord = ds.get_coord(rank)
        assert coordinates(rank, tp, pp, dp) == (coord.pipe, coord.data, coord.model)
        topology = Topology(tp, pp, dp, rank)
        assert (topology.pp_rank, topology.dp_rank, topology.tp_rank) == (coord.pipe, coord.data, coord.model)
        assert ds.get_rank(pipe=topology.pp_rank, data=topology.dp_rank, model=topology.tp_rank) == rank


@pytest.mark.parametrize("tp, pp, dp", LAYOUTS)
def test_groups_match_deepspeed(tp, pp, dp):
    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for axis, ds_axis in DS_AXIS.items():
        assert group_ranks(axis, tp, pp, dp) == ds.get_axis_comm_lists(ds_axis)
    # DeepSpeed's grid: the model-parallel group is every rank of one data-parallel index
    assert group_ranks("model", tp, pp, dp) == [sorted(ds.get_axis_list("data", d)) for d in range(dp)]
    for rank in range(tp * pp * dp):
        topology = Topology(tp, pp, dp, rank)
        (data_ranks,) = [ranks for ranks in group_ranks("data", tp, pp, dp) if rank in ranks]
        assert topology.get_data_parallel_group_ranks() == data_ranks
        (model_ranks,) = [ranks for ranks in group_ranks("model", tp, pp, dp) if rank in ranks]
        assert model_ranks[topology.get_model_parallel_rank()] == rank
        assert topology.get_tensor_model_parallel_src_rank() == ds.get_rank(
            pipe=topology.pp_rank, data=topology.dp_rank, model=0)


def test_ds_topology_is_deepspeeds():
    ds = Topology(2, 3, 4, 0).ds_topology()
    assert isinstance(ds, PipeModelDataParallelTopology)
    assert (ds.get_dim("pipe"), ds.get_dim("data"), ds.get_dim("model")) == (3, 4, 2)


def test_single_has_no_groups():
    topology = Topology.single()
    assert (topology.tp, topology.pp, topology.dp, topology.world_size, topology.rank) == (1, 1, 1, 1, 0)
    assert topology.tp_group is None and topology.pp_group is None and topology.dp_group is None
    assert topology.get_model_parallel_world_size() == 1 and topology.get_data_parallel_group() is None


def test_tp_times_pp_must_divide_world_size():
    assert data_parallel_size(2, 2, 8) == 2
    with pytest.raises(ConfigError, match=r"tp\*pp\*dp != world size.*2\*3 = 6 does not divide the world size 8"):
        data_parallel_size(2, 3, 8)
    with pytest.raises(ConfigError, match="must both be >= 1"):
        data_parallel_size(0, 1, 8)


def _members(group) -> list[int]:
    """The global ranks of a group, found by communication (all-gather of each member's rank)."""
    ranks = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ranks, torch.tensor([dist.get_rank()]), group=group)
    return [int(r) for r in ranks]


def _four_ranks(rank: int, world_size: int, tp: int, pp: int) -> None:
    topology = Topology.create(tp, pp)
    dp = world_size // (tp * pp)
    assert (topology.tp, topology.pp, topology.dp, topology.rank) == (tp, pp, dp, rank)
    mine = {axis: next(r for r in group_ranks(axis, tp, pp, dp) if rank in r) for axis in AXES}
    assert _members(topology.get_tensor_model_parallel_group()) == mine["tensor"]
    assert _members(topology.get_pipe_parallel_group()) == mine["pipe"]
    assert _members(topology.get_data_parallel_group()) == mine["data"]
    assert _members(topology.get_model_parallel_group()) == mine["model"]
    assert topology.get_model_parallel_rank() == dist.get_rank(topology.get_model_parallel_group())
    assert topology.get_data_parallel_rank() == dist.get_rank(topology.get_data_parallel_group())
    for size, group in ((tp, topology.tp_group), (pp, topology.pp_group), (dp, topology.dp_group)):
        assert (group is None) == (size == 1)
    assert topology.tp_rank == dist.get_rank(topology.tp_group)


@pytest.mark.parametrize("tp, pp", [(2, 2), (2, 1)])
def test_four_ranks_build_the_groups(tp, pp):
    run_distributed(_four_ranks, 4, tp, pp)
