"""The 3D process topology: tensor (tp) x pipeline (pp) x data (dp) parallel sizes, this rank's coordinates,
and the process groups of each axis.

The rank order is DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model; the last varies
fastest), so the pipeline engine's grid and our tensor-parallel groups are the same ranks:
    rank = (pp_rank * dp + dp_rank) * tp + tp_rank
Tensor-parallel ranks are adjacent (inside a node: they talk every layer); pipeline stages are furthest
apart (they only exchange activations).
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from trainer.config import data_parallel_size

AXES = ("tensor", "pipe", "data", "model")
"""Group kinds: the three axes, and "model" = all tp x pp ranks of one data-parallel replica."""


def coordinates(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank) of a global rank."""
    if not 0 <= rank < tp * pp * dp:
        raise ValueError(f"rank {rank} is outside a world of {tp * pp * dp}")
    return rank // (dp * tp), rank // tp % dp, rank % tp


def rank_at(pp_rank: int, dp_rank: int, tp_rank: int, tp: int, dp: int) -> int:
    """The global rank at these coordinates: (pp_rank * dp + dp_rank) * tp + tp_rank."""
    return (pp_rank * dp + dp_rank) * tp + tp_rank


def group_ranks(axis: str, tp: int, pp: int, dp: int) -> list[list[int]]:
    """Every group of one kind (see AXES) as sorted global ranks, in a fixed order that every rank shares."""
    if axis == "tensor":
        return [[rank_at(p, d, t, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)]
    if axis == "pipe":
        return [[rank_at(p, d, t, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    if axis == "data":
        return [[rank_at(p, d, t, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    if axis == "model":
        return [[rank_at(p, d, t, tp, dp) for p in range(pp) for t in range(tp)] for d in range(dp)]
    raise ValueError(f"unknown group kind {axis!r}; one of {AXES}")


class Topology:
    """Sizes, this rank's coordinates and its process groups (torchtitan's ParallelDims).

    `tp_group`, `pp_group`, `dp_group` are None when the axis has one rank or there is no process group,
    so the parallel verbs become the identity. The DeepSpeed `mpu` methods return real groups even of
    size 1, because DeepSpeed reads a None group as "the whole world"."""

    def __init__(self, tp: int, pp: int, dp: int, rank: int,
                 groups: Optional[dict[str, dist.ProcessGroup]] = None):
        self.tp, self.pp, self.dp = tp, pp, dp
        self.world_size = tp * pp * dp
        self.rank = rank
        self.pp_rank, self.dp_rank, self.tp_rank = coordinates(rank, tp, pp, dp)
        self._groups = groups or {}
        self.tp_group = self._groups.get("tensor") if tp > 1 else None
        self.pp_group = self._groups.get("pipe") if pp > 1 else None
        self.dp_group = self._groups.get("data") if dp > 1 else None

    @classmethod
    def create(cls, tp: int, pp: int) -> "Topology":
        """Build every group of every kind on an initialised torch.distributed (a collective: every rank
        must call it, and calls new_group for every group in the same order); dp = world / (tp * pp)."""
        if not dist.is_initialized():
            raise RuntimeError("Topology.create needs torch.distributed initialised; use Topology.single() "
                               "for a run without process groups")
        world_size, rank = dist.get_world_size(), dist.get_rank()
        dp = data_parallel_size(tp, pp, world_size)
        groups = {}
        for axis in AXES:
            for ranks in group_ranks(axis, tp, pp, dp):
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    groups[axis] = group
        return cls(tp, pp, dp, rank, groups)

    @classmethod
    def single(cls) -> "Topology":
        """One process, no process groups."""
        return cls(1, 1, 1, 0)

    def ds_topology(self) -> PipeModelDataParallelTopology:
        """The same layout as DeepSpeed's topology object, for PipelineModule(topology=...)."""
        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)

    def __repr__(self) -> str:
        return (f"Topology(tp={self.tp}, pp={self.pp}, dp={self.dp}, rank={self.rank}: "
                f"pp_rank={self.pp_rank}, dp_rank={self.dp_rank}, tp_rank={self.tp_rank})")

    # ---- DeepSpeed's mpu interface (the names its engine, ZeRO and checkpointing call) ----------------
    # "model parallel" is every rank of one data-parallel replica (tp x pp), as in DeepSpeed's
    # PipelineParallelGrid and Megatron: gradient norms and overflow checks reduce over it.

    def get_global_rank(self) -> int:
        return self.rank

    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.tp + self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp * self.pp

    def get_model_parallel_group(self) -> Optional[dist.ProcessGroup]:
        return self._groups.get("model")

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self) -> Optional[dist.ProcessGroup]:
        return self._groups.get("tensor")

    def get_tensor_model_parallel_src_rank(self) -> int:
        """The global rank of tensor-parallel rank 0 in this rank's tensor group."""
        return self.rank - self.tp_rank

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    def get_pipe_parallel_group(self) -> Optional[dist.ProcessGroup]:
        return self._groups.get("pipe")

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self) -> Optional[dist.ProcessGroup]:
        return self._groups.get("data")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return [rank_at(self.pp_rank, d, self.tp_rank, self.tp, self.dp) for d in range(self.dp)]
