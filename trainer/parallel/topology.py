"""The process topology of a run (torchtitan's ParallelDims): its layout (the sizes of the named axes pp, dp,
cp, ep, tp and the rank order: trainer/parallel/mesh.py), this rank's coordinate on each axis, and its process
group of every kind in mesh.GROUPS.

DeepSpeed's topology and `mpu` are built from this one in the engine (trainer/engine/ds_topology.py).
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from trainer.parallel.mesh import GROUPS, Layout


class Topology:
    """The layout, this rank's coordinates and its process groups.

    The `*_group` attributes are None when the group has one rank or there are no process groups, so the
    verbs of mappings.py and comm.py become the identity; `process_groups` holds every group this rank is
    in by name, size 1 included (DeepSpeed reads a None group as "the whole world")."""

    def __init__(self, layout: Layout, rank: int, groups: Optional[dict[str, dist.ProcessGroup]] = None):
        self.layout = layout
        self.rank = rank
        self.world_size = layout.world_size
        self.process_groups = groups or {}
        self.tp, self.pp, self.dp, self.cp, self.ep = layout.tp, layout.pp, layout.dp, layout.cp, layout.ep
        coords = layout.coordinates(rank)
        self.pp_rank, self.dp_rank, self.cp_rank, self.tp_rank = coords["pp"], coords["dp"], coords["cp"], coords["tp"]
        self.ep_rank, self.edp_rank = coords["ep"], coords["edp"]
        self.tp_group, self.pp_group = self.group("tp"), self.group("pp")
        self.dp_group, self.cp_group = self.group("dp"), self.group("cp")
        self.dp_cp_group, self.model_group = self.group("dp_cp"), self.group("model")
        self.ep_group, self.edp_group = self.group("ep"), self.group("edp")

    def group(self, name: str) -> Optional[dist.ProcessGroup]:
        """This rank's group of kind `name` (mesh.GROUPS); None when it has one rank or there are no groups."""
        return self.process_groups.get(name) if self.layout.group_size(name) > 1 else None

    def rank_in(self, name: str) -> int:
        """This rank's position in its group of kind `name`."""
        return self.layout.rank_in_group(name, self.rank)

    @classmethod
    def create(cls, tp: int, pp: int, cp: int = 1, ep: int = 1) -> "Topology":
        """Build every group of every kind on an initialised torch.distributed, dp = world / (pp * cp * tp). A
        collective: every rank calls new_group for every group in the same order (groups with the same ranks,
        such as dp and dp_cp at cp = 1, share one process group)."""
        if not dist.is_initialized():
            raise RuntimeError("Topology.create needs torch.distributed initialised; use Topology.single() "
                               "for a run without process groups")
        layout, rank = Layout.of_world(dist.get_world_size(), tp=tp, pp=pp, cp=cp, ep=ep), dist.get_rank()
        made: dict[tuple[int, ...], dist.ProcessGroup] = {}
        groups = {}
        for name in GROUPS:
            for ranks in layout.group_ranks(name):
                if tuple(ranks) not in made:
                    made[tuple(ranks)] = dist.new_group(ranks=ranks)
                if rank in ranks:
                    groups[name] = made[tuple(ranks)]
        return cls(layout, rank, groups)

    @classmethod
    def single(cls) -> "Topology":
        """One process, no process groups."""
        return cls(Layout(1, 1, 1), 0)

    def __repr__(self) -> str:
        return (f"Topology({self.layout}, rank={self.rank}: pp_rank={self.pp_rank}, dp_rank={self.dp_rank}, "
                f"cp_rank={self.cp_rank}, tp_rank={self.tp_rank}, ep_rank={self.ep_rank})")
