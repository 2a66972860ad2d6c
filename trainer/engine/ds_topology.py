"""DeepSpeed's view of the trainer's topology (trainer/parallel/topology.py): the PipeModelDataParallelTopology
that PipelineModule builds its grid from, and the `mpu` object that the plain engine, ZeRO and its checkpoints
ask for groups.

DeepSpeed knows three axes, pipe, data and model. Its model axis is our tp and its pipe axis our pp; its data
axis is our dp x cp, the ranks that hold the same dense weights and average their gradients (context-parallel
ranks see other chunks of the same sequences). The rank order makes that exact: the dp x cp ranks of one
(pp, tp) coordinate are numbered dp_rank * cp + cp_rank (trainer/parallel/mesh.py), which is DeepSpeed's data
coordinate. `pipe_topology` checks that DeepSpeed's groups are ours before handing it over.
"""
from __future__ import annotations

from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from trainer.parallel.comm import Group
from trainer.parallel.mesh import Layout
from trainer.parallel.topology import Topology

DEEPSPEED_AXES = {"pipe": "pp", "data": "dp_cp", "model": "tp"}
"""DeepSpeed's axis -> the trainer's group of the same ranks."""


def pipe_topology(layout: Layout) -> PipeModelDataParallelTopology:
    """DeepSpeed's topology of the same ranks, for PipelineModule(topology=...); a RuntimeError if any of its
    groups differs from ours (it would pair tensor shards or pipeline stages of different ranks)."""
    ds = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp * layout.cp)
    for ds_axis, name in DEEPSPEED_AXES.items():
        if ds.get_axis_comm_lists(ds_axis) != layout.group_ranks(name):
            raise RuntimeError(f"DeepSpeed's {ds_axis!r} groups {ds.get_axis_comm_lists(ds_axis)} are not the "
                               f"trainer's {name!r} groups {layout.group_ranks(name)} at {layout}")
    return ds


class DeepSpeedMPU:
    """The `mpu` DeepSpeed asks for groups (deepspeed.initialize, zero.Init): "data parallel" is dp x cp (the
    gradient reduction), "model parallel" every tp x pp rank of one replica (gradient norms and overflow
    checks reduce over it, as in DeepSpeed's PipelineParallelGrid and Megatron), "tensor" tp, "pipe" pp.

    Groups of one rank are real process groups here, not None: DeepSpeed reads a None group as the world."""

    def __init__(self, topology: Topology):
        self.topology = topology

    def _group(self, name: str) -> Group:
        return self.topology.process_groups.get(name)

    def get_global_rank(self) -> int:
        return self.topology.rank

    def get_model_parallel_rank(self) -> int:
        return self.topology.rank_in("model")

    def get_model_parallel_world_size(self) -> int:
        return self.topology.layout.group_size("model")

    def get_model_parallel_group(self) -> Group:
        return self._group("model")

    def get_tensor_model_parallel_rank(self) -> int:
        return self.topology.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.topology.tp

    def get_tensor_model_parallel_group(self) -> Group:
        return self._group("tp")

    def get_tensor_model_parallel_src_rank(self) -> int:
        """The global rank of tensor-parallel rank 0 in this rank's tensor group."""
        return self.topology.rank - self.topology.tp_rank

    def get_pipe_parallel_rank(self) -> int:
        return self.topology.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.topology.pp

    def get_pipe_parallel_group(self) -> Group:
        return self._group("pp")

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.topology.rank_in("dp_cp")

    def get_data_parallel_world_size(self) -> int:
        return self.topology.layout.group_size("dp_cp")

    def get_data_parallel_group(self) -> Group:
        return self._group("dp_cp")

    def get_data_parallel_group_ranks(self) -> list[int]:
        (ranks,) = [ranks for ranks in self.topology.layout.group_ranks("dp_cp") if self.topology.rank in ranks]
        return ranks
