"""The layout's rank arithmetic (trainer/parallel/mesh.py) and the topology's process groups
(trainer/parallel/topology.py): at cp = ep = 1 every group is the one the trainer used before the named axes
(the formulas are written out below) and DeepSpeed's grid agrees (trainer/engine/ds_topology.py); at
pp 2, dp 2, cp 2, tp 2 every kind of group partitions the world and the rank order is the documented one;
the expert groups are carved out of the dp x cp ranks as documented; groups built on 4 gloo ranks hold
those ranks. Pure arithmetic except the last tests."""
import itertools

import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from tests.distributed import run_distributed
from trainer.config import Config
from trainer.engine.ds_topology import DeepSpeedMPU, pipe_topology
from trainer.errors import ConfigError
from trainer.parallel.mesh import EXPERT_MESH, GROUPS, MESH, Layout
from trainer.parallel.topology import Topology

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2), (4, 3, 2),
           (2, 4, 3)]  # (tp, pp, dp)


# ---- the rank order and groups before the named axes, written out ----------------------------------------

def old_coordinates(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank): rank = (pp_rank * dp + dp_rank) * tp + tp_rank."""
    return rank // (dp * tp), rank // tp % dp, rank % tp


def old_rank_at(p: int, d: int, t: int, tp: int, dp: int) -> int:
    return (p * dp + d) * tp + t


def old_group_ranks(kind: str, tp: int, pp: int, dp: int) -> list[list[int]]:
    if kind == "tensor":
        return [[old_rank_at(p, d, t, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)]
    if kind == "pipe":
        return [[old_rank_at(p, d, t, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    if kind == "data":
        return [[old_rank_at(p, d, t, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    assert kind == "model"
    return [[old_rank_at(p, d, t, tp, dp) for p in range(pp) for t in range(tp)] for d in range(dp)]


OLD_KIND = {"tp": "tensor", "pp": "pipe", "dp": "data", "dp_cp": "data", "model": "model"}


@pytest.mark.parametrize("tp, pp, dp", LAYOUTS)
def test_at_cp_ep_1_the_groups_are_the_old_ones(tp, pp, dp):
    layout = Layout(tp, pp, dp)
    for name, kind in OLD_KIND.items():
        assert layout.group_ranks(name) == old_group_ranks(kind, tp, pp, dp), name
    assert layout.group_ranks("cp") == layout.group_ranks("ep") == [[rank] for rank in range(tp * pp * dp)]
    assert layout.group_ranks("edp") == layout.group_ranks("dp")
    for rank in range(tp * pp * dp):
        topology = Topology(layout, rank)
        assert (topology.pp_rank, topology.dp_rank, topology.tp_rank) == old_coordinates(rank, tp, pp, dp)
        assert (topology.cp_rank, topology.ep_rank, topology.edp_rank) == (0, 0, topology.dp_rank)
        assert layout.rank_at(pp=topology.pp_rank, dp=topology.dp_rank, tp=topology.tp_rank) == rank


@pytest.mark.parametrize("tp, pp, dp", LAYOUTS)
def test_deepspeeds_grid_agrees(tp, pp, dp):
    layout = Layout(tp, pp, dp)
    ds = pipe_topology(layout)
    assert isinstance(ds, PipeModelDataParallelTopology)
    assert (ds.get_dim("pipe"), ds.get_dim("data"), ds.get_dim("model")) == (pp, dp, tp)
    for ds_axis, name in (("model", "tp"), ("pipe", "pp"), ("data", "dp")):
        assert ds.get_axis_comm_lists(ds_axis) == layout.group_ranks(name)
    assert layout.group_ranks("model") == [sorted(ds.get_axis_list("data", d)) for d in range(dp)]
    for rank in range(tp * pp * dp):
        coord, mpu = ds.get_coord(rank), DeepSpeedMPU(Topology(layout, rank))
        assert (mpu.get_pipe_parallel_rank(), mpu.get_data_parallel_rank(), mpu.get_tensor_model_parallel_rank()) \
            == (coord.pipe, coord.data, coord.model)
        (data_ranks,) = [ranks for ranks in old_group_ranks("data", tp, pp, dp) if rank in ranks]
        assert mpu.get_data_parallel_group_ranks() == data_ranks
        (model_ranks,) = [ranks for ranks in old_group_ranks("model", tp, pp, dp) if rank in ranks]
        assert model_ranks[mpu.get_model_parallel_rank()] == rank
        assert mpu.get_model_parallel_world_size() == tp * pp and mpu.get_data_parallel_world_size() == dp
        assert mpu.get_tensor_model_parallel_src_rank() == ds.get_rank(pipe=coord.pipe, data=coord.data, model=0)


def test_deepspeeds_data_axis_is_dp_times_cp():
    layout = Layout(tp=2, pp=2, dp=2, cp=2)
    ds = pipe_topology(layout)
    assert ds.get_dim("data") == 4 and ds.get_axis_comm_lists("data") == layout.group_ranks("dp_cp")
    mpu = DeepSpeedMPU(Topology(layout, rank=7))
    assert mpu.get_data_parallel_world_size() == 4 and mpu.get_data_parallel_group_ranks() == [1, 3, 5, 7]


# ---- four axes: pp 2, dp 2, cp 2, tp 2 --------------------------------------------------------------------

FOUR_AXES = Layout(tp=2, pp=2, dp=2, cp=2)


def test_the_rank_order_is_the_documented_formula():
    layout = FOUR_AXES
    assert layout.world_size == 16
    ranks = []
    for p, d, c, t in itertools.product(range(2), repeat=4):  # slowest first: pp, dp, cp, tp
        rank = ((p * layout.dp + d) * layout.cp + c) * layout.tp + t
        assert layout.rank_at(pp=p, dp=d, cp=c, tp=t) == rank
        coords = layout.coordinates(rank)
        assert (coords["pp"], coords["dp"], coords["cp"], coords["tp"]) == (p, d, c, t)
        ranks.append(rank)
    assert ranks == list(range(16))


@pytest.mark.parametrize("name", list(GROUPS))
def test_every_kind_of_group_partitions_the_world(name):
    layout = Layout(tp=2, pp=2, dp=2, cp=2, ep=2)
    groups = layout.group_ranks(name)
    assert sorted(r for group in groups for r in group) == list(range(layout.world_size))
    assert all(len(group) == layout.group_size(name) for group in groups)
    mesh = MESH if set(GROUPS[name]) <= set(MESH) else EXPERT_MESH
    for group in groups:
        coords = [layout.coordinates(r) for r in group]
        # the axes outside the group are fixed; the group's own axes take every combination once
        assert all(c[axis] == coords[0][axis] for c in coords for axis in mesh if axis not in GROUPS[name])
        assert len({tuple(c[axis] for axis in GROUPS[name]) for c in coords}) == len(group)
        assert [layout.rank_in_group(name, r) for r in group] == list(range(len(group)))


def test_the_named_groups_of_four_axes():
    layout = FOUR_AXES
    assert layout.group_ranks("tp")[:2] == [[0, 1], [2, 3]]
    assert layout.group_ranks("cp")[:2] == [[0, 2], [1, 3]]
    assert layout.group_ranks("dp")[:2] == [[0, 4], [1, 5]]
    assert layout.group_ranks("pp")[:2] == [[0, 8], [1, 9]]
    assert layout.group_ranks("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert layout.group_ranks("model") == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    topology = Topology(layout, rank=13)  # pp 1, dp 1, cp 0, tp 1
    assert (topology.pp_rank, topology.dp_rank, topology.cp_rank, topology.tp_rank) == (1, 1, 0, 1)
    assert topology.rank_in("dp_cp") == 2 and topology.rank_in("model") == 3


# ---- expert parallelism: carved out of the dp x cp ranks -------------------------------------------------

def test_expert_groups_at_dp_4_ep_2():
    layout = Layout(tp=1, pp=1, dp=4, ep=2)
    assert layout.group_ranks("ep") == [[0, 1], [2, 3]]   # consecutive data-parallel ranks
    assert layout.group_ranks("edp") == [[0, 2], [1, 3]]  # the ranks holding the same experts
    with_tp = Layout(tp=2, pp=1, dp=4, ep=2)  # rank = dp_rank * 2 + tp_rank
    assert with_tp.group_ranks("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert with_tp.group_ranks("edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    topology = Topology(with_tp, rank=6)  # dp_rank 3, tp_rank 0
    assert (topology.ep_rank, topology.edp_rank, topology.ep, topology.layout.edp) == (1, 1, 2, 2)


def test_expert_groups_take_cp_ranks_first():
    layout = Layout(tp=1, pp=1, dp=2, cp=2, ep=2)  # dp_cp_rank = dp_rank * 2 + cp_rank
    assert layout.group_ranks("ep") == layout.group_ranks("cp") == [[0, 1], [2, 3]]
    assert layout.group_ranks("edp") == layout.group_ranks("dp") == [[0, 2], [1, 3]]
    assert Layout(tp=1, pp=1, dp=2, cp=2, ep=4).group_ranks("ep") == [[0, 1, 2, 3]]


def test_a_layout_refuses_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"ep=3 does not divide dp \* cp = 4\*1 = 4"):
        Layout(tp=1, pp=1, dp=4, ep=3)
    with pytest.raises(ValueError, match="the cp size must be an integer >= 1, got 0"):
        Layout(1, 1, 1, cp=0)
    with pytest.raises(ValueError, match=r"tp \* pp \* cp = 2\*3\*1 = 6 does not divide the world size 8"):
        Layout.of_world(8, tp=2, pp=3)
    with pytest.raises(ValueError, match="the pp size must be an integer >= 1, got 0"):
        Layout.of_world(8, tp=2, pp=0)
    assert Layout.of_world(16, tp=2, pp=2, cp=2) == FOUR_AXES
    with pytest.raises(ValueError, match="rank 16 is outside a world of 16"):
        FOUR_AXES.coordinates(16)


def test_single_has_no_groups():
    topology = Topology.single()
    assert (topology.tp, topology.pp, topology.dp, topology.cp, topology.ep) == (1, 1, 1, 1, 1)
    assert (topology.world_size, topology.rank) == (1, 0)
    assert all(topology.group(name) is None for name in GROUPS)
    assert topology.tp_group is None and topology.dp_cp_group is None and topology.model_group is None


# ---- the config keys -----------------------------------------------------------------------------------

def test_the_config_computes_dp_and_checks_the_ep_rule():
    config = Config()
    config.parallel.tp, config.parallel.pp = 2, 2
    assert config.data_parallel_size(8) == 2 and config.parallel.layout(8) == Layout(2, 2, 2)
    with pytest.raises(ConfigError, match=r"tp\*pp\*dp != world size: tp \* pp \* cp = 2\*2\*1 = 4 does not "
                                          r"divide the world size 6"):
        config.data_parallel_size(6)
    config.parallel.tp, config.parallel.pp, config.parallel.ep = 1, 1, 3
    with pytest.raises(ConfigError, match=r"parallel.ep=3: ep=3 does not divide dp \* cp = 4\*1 = 4"):
        config.parallel.layout(4)


def test_expert_parallelism_needs_experts_that_split_evenly_and_zero_1_or_2_outside_fp32():
    config = Config()
    config.parallel.ep = 2
    with pytest.raises(ConfigError, match="parallel.ep=2 on a dense model: .* set model.moe_num_experts, or "
                                          "parallel.ep=1"):
        config.validate(world_size=4)
    config.model.moe_num_experts, config.model.moe_top_k, config.model.mlp = 6, 2, "swiglu"
    config.parallel.ep = 4
    with pytest.raises(ConfigError, match="parallel.ep=4 does not divide model.moe_num_experts=6"):
        config.validate(world_size=4)
    config.parallel.ep = 2
    config.validate(world_size=4)  # the default optim.zero_stage is 1
    config.optim.zero_stage = 3
    with pytest.raises(ConfigError, match="parallel.ep=2 with optim.zero_stage=3: .* set optim.zero_stage=1 or 2"):
        config.validate(world_size=4)
    config.optim.zero_stage, config.train.precision = 0, "bf16"
    with pytest.raises(ConfigError, match="parallel.ep=2 with train.precision=bf16 needs ZeRO"):
        config.validate(world_size=4)
    config.train.precision = "fp32"
    config.validate(world_size=4)
    config.optim.zero_stage, config.parallel.pp = 1, 2
    with pytest.raises(ConfigError, match="parallel.ep=2 with parallel.pp=2 and optim.zero_stage=1"):
        config.validate(world_size=8)


# ---- process groups on 4 gloo ranks --------------------------------------------------------------------

def _members(group) -> list[int]:
    """The global ranks of a group, found by communication (all-gather of each member's rank)."""
    ranks = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ranks, torch.tensor([dist.get_rank()]), group=group)
    return [int(r) for r in ranks]


def _four_ranks(rank: int, world_size: int, tp: int, pp: int, cp: int, ep: int) -> None:
    topology = Topology.create(tp, pp, cp=cp, ep=ep)
    layout = topology.layout
    assert layout == Layout(tp, pp, world_size // (tp * pp * cp), cp=cp, ep=ep) and topology.rank == rank
    for name in GROUPS:
        (mine,) = [ranks for ranks in layout.group_ranks(name) if rank in ranks]
        assert _members(topology.process_groups[name]) == mine, name
        assert (topology.group(name) is None) == (len(mine) == 1), name
        assert topology.rank_in(name) == dist.get_rank(topology.process_groups[name]), name
    mpu = DeepSpeedMPU(topology)
    assert _members(mpu.get_tensor_model_parallel_group()) == _members(topology.process_groups["tp"])
    assert _members(mpu.get_data_parallel_group()) == _members(topology.process_groups["dp_cp"])
    assert mpu.get_model_parallel_rank() == dist.get_rank(mpu.get_model_parallel_group())
    assert mpu.get_data_parallel_rank() == dist.get_rank(mpu.get_data_parallel_group())


@pytest.mark.parametrize("tp, pp, cp, ep", [(2, 2, 1, 1), (2, 1, 1, 1), (1, 1, 2, 2)])
def test_four_ranks_build_the_groups(tp, pp, cp, ep):
    run_distributed(_four_ranks, 4, tp, pp, cp, ep)
