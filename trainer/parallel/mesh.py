"""The layout of a run: the sizes of its named parallel axes, and the rank arithmetic on them (pure integers,
no process groups; trainer/parallel/topology.py builds the groups).

The axes, as in torchtitan's ParallelDims:
    pp  pipeline stages            dp  data-parallel replicas      cp  context parallel (sequence chunks)
    tp  tensor parallel            ep  expert parallel (carved out of the dp x cp ranks, below)

The rank order, the one statement of it (MESH, slowest-varying axis first):
    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank
At cp = 1 this is DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model). Tensor-parallel ranks
are adjacent (inside a node: they talk every layer), context-parallel ranks next (they exchange keys and
values every attention), pipeline stages furthest apart (they only pass activations at stage edges).

Expert parallelism borrows ranks instead of adding them: the dp x cp ranks of one (pp, tp) coordinate,
numbered dp_cp_rank = dp_rank * cp + cp_rank, are factored again as dp_cp_rank = edp_rank * ep + ep_rank
(EXPERT_MESH). So ep must divide dp * cp; an ep group is ep consecutive dp_cp ranks, and the expert-data
group it leaves (edp, of size dp * cp / ep) holds the ranks with the same experts, which reduce the
experts' gradients as dp_cp reduces the dense weights'.

A new axis is a new name in MESH (or a refactoring view beside EXPERT_MESH) and in GROUPS; every group's
ranks follow from the order alone (Layout.group_ranks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

MESH = ("pp", "dp", "cp", "tp")
"""The axes whose sizes multiply to the world size, slowest-varying first."""

EXPERT_MESH = ("pp", "edp", "ep", "tp")
"""The same ranks with each (pp, tp) coordinate's dp x cp ranks factored as edp x ep (module docstring)."""

GROUPS = {
    "pp": ("pp",), "dp": ("dp",), "cp": ("cp",), "tp": ("tp",),
    "dp_cp": ("dp", "cp"),  # every copy of the dense weights: gradient reduction, DeepSpeed's "data parallel"
    "model": ("pp", "tp"),  # one replica of the model: the gradient norm, DeepSpeed's "model parallel"
    "ep": ("ep",),          # the ranks that split the experts between them
    "edp": ("edp",),        # every copy of one rank's experts: their gradient reduction
}
"""Every process group by name: the axes its ranks vary along (all of one mesh), the others fixed."""


@dataclass(frozen=True)
class Layout:
    """The sizes of the parallel axes, each >= 1: world_size = pp * dp * cp * tp processes; ep divides dp * cp.
    Constructed as Layout(tp, pp, dp) (the order of the trainer's "(tp, pp, dp) layout"), cp and ep by keyword."""

    tp: int
    pp: int
    dp: int
    cp: int = field(default=1, kw_only=True)
    ep: int = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        for axis in ("tp", "pp", "dp", "cp", "ep"):
            _check_size(axis, getattr(self, axis))
        if self.dp * self.cp % self.ep:
            raise ValueError(f"ep={self.ep} does not divide dp * cp = {self.dp}*{self.cp} = {self.dp * self.cp}: "
                             f"expert parallelism is carved out of the data- and context-parallel ranks")

    @classmethod
    def of_world(cls, world_size: int, tp: int, pp: int, cp: int = 1, ep: int = 1) -> "Layout":
        """The layout with dp = world_size / (pp * cp * tp), the one place dp is computed; a ValueError when the
        product does not divide the world size."""
        for axis, size in (("tp", tp), ("pp", pp), ("cp", cp)):
            _check_size(axis, size)
        model = tp * pp * cp
        if world_size % model:
            raise ValueError(f"tp * pp * cp = {tp}*{pp}*{cp} = {model} does not divide the world size {world_size}")
        return cls(tp, pp, world_size // model, cp=cp, ep=ep)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def edp(self) -> int:
        """The expert-data-parallel size: dp * cp / ep."""
        return self.dp * self.cp // self.ep

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's coordinate on every axis of MESH and EXPERT_MESH."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        coords = dict(zip(MESH, _unravel(rank, self._sizes(MESH))))
        coords.update(zip(EXPERT_MESH, _unravel(rank, self._sizes(EXPERT_MESH))))
        return coords

    def rank_at(self, **coords: int) -> int:
        """The global rank at these MESH coordinates (an axis left out is 0)."""
        rank = 0
        for axis in MESH:
            rank = rank * getattr(self, axis) + coords.get(axis, 0)
        return rank

    def group_size(self, name: str) -> int:
        size = 1
        for axis in _axes_of(name):
            size *= getattr(self, axis)
        return size

    def rank_in_group(self, name: str, rank: int) -> int:
        """The position of `rank` in its group `name` (the group's ranks are sorted, so this is the group's own
        numbering: the coordinates of the group's axes read as one number, the slowest first)."""
        coords, position = self.coordinates(rank), 0
        for axis in _mesh_of(name):
            if axis in GROUPS[name]:
                position = position * getattr(self, axis) + coords[axis]
        return position

    def group_ranks(self, name: str) -> list[list[int]]:
        """Every group of kind `name` (GROUPS) as sorted global ranks, in one order that every rank shares: by the
        coordinates of the axes that stay fixed, the slowest first."""
        mesh, varying = _mesh_of(name), _axes_of(name)
        fixed = [i for i, axis in enumerate(mesh) if axis not in varying]
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            coords = _unravel(rank, self._sizes(mesh))
            groups.setdefault(tuple(coords[i] for i in fixed), []).append(rank)
        return list(groups.values())

    def _sizes(self, mesh: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in mesh)


def _check_size(axis: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"the {axis} size must be an integer >= 1, got {size!r}")


def _axes_of(name: str) -> tuple[str, ...]:
    if name not in GROUPS:
        raise ValueError(f"unknown group {name!r}; one of {', '.join(GROUPS)}")
    return GROUPS[name]


def _mesh_of(name: str) -> tuple[str, ...]:
    """The mesh whose axes include every axis of group `name`."""
    axes = _axes_of(name)
    for mesh in (MESH, EXPERT_MESH):
        if set(axes) <= set(mesh):
            return mesh
    raise ValueError(f"group {name!r} mixes axes of two meshes: {axes}")


def _unravel(rank: int, sizes: tuple[int, ...]) -> list[int]:
    """A flat index -> its coordinates in a row-major array of `sizes` (the last varies fastest)."""
    coords = []
    for size in reversed(sizes):
        rank, coord = divmod(rank, size)
        coords.append(coord)
    return coords[::-1]
