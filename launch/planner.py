"""The layout planner: from a cluster and a config to (tp, pp, dp, micro-batch, accumulation,
activation recomputation), following the rules that work at scale (Narayanan et al. 2021, GLM-130B):

- tensor parallelism stays inside a node: tp <= devices per node, tp divides every node's device
  count, the attention heads and the MLP width;
- pipeline parallelism only when the model fits no other way: the smallest pp wins, and at each pp
  plain training is preferred to activation recomputation, then the smallest tp;
- data parallelism takes the rest: dp = world / (tp * pp), and dp must divide the global batch;
- the micro-batch is the largest that fits whose 1F1B bubble (pp - 1) / (grad_accum + pp - 1) stays
  under BUBBLE_LIMIT; when none does, the smallest that fits (the most micro-batches in flight).

What the user fixed (--tp, --pp, --micro-batch, or the same keys in the YAML / --set) is validated,
not chosen. Rank order is DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model):
rank = (pp_rank * dp + dp_rank) * tp + tp_rank, so a tensor-parallel group is adjacent ranks on one node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from launch.devices import Cluster
from launch.memory import Layout, StageMemory, Workload, stage_memory
from trainer.config import Config
from trainer.engine.partition import blocks_per_stage
from trainer.errors import ConfigError

BUBBLE_LIMIT = 0.10
MAX_NODES_SEARCHED = 1024


@dataclass(frozen=True)
class Fixed:
    """The layout choices the user made; None = the planner chooses."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    micro_batch: Optional[int] = None
    recompute_interval: Optional[int] = None


@dataclass(frozen=True)
class Plan:
    layout: Layout
    cluster: Cluster
    blocks: list[int]
    stages: list[StageMemory]
    global_batch: int

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total)

    def overrides(self) -> list[str]:
        """The layout as glm-train `--set` values."""
        layout = self.layout
        return [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}",
                f"parallel.micro_batch_size={layout.micro_batch}",
                f"parallel.recompute_interval={layout.recompute_interval}"]

    def ranks(self) -> list[dict]:
        """Host, device, (pp, dp, tp) coordinates and blocks [first, stop) of every global rank."""
        tp, dp = self.layout.tp, self.layout.dp
        starts = [sum(self.blocks[:stage]) for stage in range(len(self.blocks))]
        table = []
        for rank, (host, device) in enumerate(self.cluster.rank_devices()):
            pp_rank, dp_rank, tp_rank = rank // (tp * dp), (rank // tp) % dp, rank % tp
            table.append({"rank": rank, "host": host, "device": device, "pp_rank": pp_rank,
                          "dp_rank": dp_rank, "tp_rank": tp_rank,
                          "blocks": [starts[pp_rank], starts[pp_rank] + self.blocks[pp_rank]]})
        return table

    def to_dict(self) -> dict:
        layout, peak = self.layout, self.peak
        return {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world_size": layout.world_size,
                "micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum,
                "global_batch": self.global_batch, "recompute_interval": layout.recompute_interval,
                "pipeline_bubble": round(bubble(layout), 4), "blocks_per_stage": self.blocks,
                "devices": self.cluster.to_dict(),
                "memory": {"per_gpu_estimate_bytes": peak.total, "per_gpu_estimate_gb": round(peak.total / 1e9, 2),
                           "capacity_gb": round(self.cluster.memory_bytes / 1e9, 2), "peak_stage": peak.stage,
                           "stages": [stage.to_dict() for stage in self.stages]},
                "overrides": self.overrides(), "ranks": self.ranks()}


def bubble(layout: Layout) -> float:
    """Idle fraction of a 1F1B pipeline step: (pp - 1) / (grad_accum + pp - 1)."""
    return (layout.pp - 1) / (layout.grad_accum + layout.pp - 1)


def estimate(work: Workload, layout: Layout) -> list[StageMemory]:
    """The memory estimate of every pipeline stage of a layout."""
    blocks = blocks_per_stage(work.model.num_layers, layout.pp)
    return [stage_memory(work, layout, stage, count) for stage, count in enumerate(blocks)]


def _fits(work: Workload, layout: Layout, capacity: int) -> bool:
    return max(stage.total for stage in estimate(work, layout)) <= capacity


def _tp_choices(work: Workload, cluster: Cluster, fixed: Fixed) -> list[int]:
    if fixed.tp is not None:
        return [fixed.tp]
    model = work.model
    return [tp for tp in range(1, cluster.devices_per_node + 1)
            if model.num_attention_heads % tp == 0 and model.num_kv_heads % tp == 0 and model.ffn_size % tp == 0
            and all(slots % tp == 0 for _, slots in cluster.hosts)]


def _choose_micro(work: Workload, tp: int, pp: int, dp: int, interval: int, per_rank: int,
                  fixed: Fixed, capacity: int) -> Optional[Layout]:
    """The micro-batch rule of the module docstring, among the divisors of the per-rank batch."""
    sizes = [fixed.micro_batch] if fixed.micro_batch else [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    fitting = []
    for micro in sizes:  # memory grows with the micro-batch: stop at the first that does not fit
        layout = Layout(tp, pp, dp, micro, per_rank // micro, interval)
        if per_rank % micro or not _fits(work, layout, capacity):
            break
        fitting.append(layout)
    if not fitting:
        return None
    short_bubble = [layout for layout in fitting if bubble(layout) <= BUBBLE_LIMIT]
    return short_bubble[-1] if short_bubble else fitting[0]


def _candidates(work: Workload, cluster: Cluster, global_batch: int, fixed: Fixed) -> Iterator[tuple[int, int, int]]:
    """(tp, pp, dp) that multiply to the world size with dp dividing the global batch, in preference order."""
    world = cluster.world_size
    pps = [fixed.pp] if fixed.pp is not None else range(1, work.model.num_layers + 1)
    for pp in pps:
        for tp in _tp_choices(work, cluster, fixed):
            if world % (tp * pp) == 0 and global_batch % (world // (tp * pp)) == 0:
                yield tp, pp, world // (tp * pp)


def search(work: Workload, cluster: Cluster, global_batch: int, fixed: Fixed = Fixed()) -> Optional[Plan]:
    """The preferred layout that fits, or None."""
    intervals = [fixed.recompute_interval] if fixed.recompute_interval is not None else [0, 1]
    candidates = list(_candidates(work, cluster, global_batch, fixed))
    for pp in sorted({pp for _, pp, _ in candidates}):
        for interval in intervals:
            for tp, _, dp in (c for c in candidates if c[1] == pp):
                layout = _choose_micro(work, tp, pp, dp, interval, global_batch // dp, fixed, cluster.memory_bytes)
                if layout is not None:
                    stages = estimate(work, layout)
                    return Plan(layout, cluster, blocks_per_stage(work.model.num_layers, pp), stages, global_batch)
    return None


def _hypothetical(cluster: Cluster, world: int) -> Cluster:
    """A cluster of `world` devices shaped like this one: a part of one node, or whole nodes."""
    per_node = cluster.devices_per_node
    if world <= per_node:
        return Cluster((("node0", world),), cluster.memory_bytes, cluster.kind, cluster.source)
    return Cluster(tuple((f"node{i}", per_node) for i in range(world // per_node)),
                   cluster.memory_bytes, cluster.kind, cluster.source)


def smallest_cluster(work: Workload, cluster: Cluster, global_batch: int, fixed: Fixed = Fixed()) -> Optional[Plan]:
    """The plan on the fewest devices of this cluster's kind and memory that fits (None: up to
    MAX_NODES_SEARCHED nodes, nothing does)."""
    per_node = cluster.devices_per_node
    for world in list(range(1, per_node)) + [per_node * n for n in range(1, MAX_NODES_SEARCHED + 1)]:
        plan = search(work, _hypothetical(cluster, world), global_batch, fixed)
        if plan is not None:
            return plan
    return None


def _lower_bound(work: Workload, cluster: Cluster, global_batch: int, fixed: Fixed) -> int:
    """Bytes per device of the most memory-frugal layout this node shape allows (largest tp, one block
    per stage, optimizer sharded over the whole global batch, micro-batch 1, recomputation)."""
    tp = max(_tp_choices(work, cluster, fixed), default=1)
    pp = fixed.pp or work.model.num_layers
    interval = 1 if fixed.recompute_interval is None else fixed.recompute_interval
    layout = Layout(tp, pp, global_batch, fixed.micro_batch or 1, 1, interval)
    return max(stage.total for stage in estimate(work, layout))


def _check_fixed(work: Workload, cluster: Cluster, fixed: Fixed) -> None:
    model, per_node = work.model, cluster.devices_per_node
    if fixed.tp is not None:
        model.validate(fixed.tp)
        if fixed.tp > per_node:
            raise ConfigError(f"tp={fixed.tp} is larger than the {per_node} devices per node: tensor parallelism "
                              f"stays inside a node; use tp <= {per_node} and let pipeline stages span nodes")
        uneven = [host for host, slots in cluster.hosts if slots % fixed.tp]
        if uneven:
            raise ConfigError(f"tp={fixed.tp} does not divide the device count of host {uneven[0]}: a tensor-"
                              f"parallel group must not straddle nodes; choose tp dividing every node's slots")
    if fixed.pp is not None:
        blocks_per_stage(model.num_layers, fixed.pp)
    for name, value in (("micro-batch", fixed.micro_batch), ("checkpoint interval", fixed.recompute_interval)):
        if value is not None and value < (1 if name == "micro-batch" else 0):
            raise ConfigError(f"the {name} must be >= {1 if name == 'micro-batch' else 0}, got {value}")
    if fixed.tp and fixed.pp and cluster.world_size % (fixed.tp * fixed.pp):
        raise ConfigError(f"tp * pp = {fixed.tp} * {fixed.pp} does not divide the {cluster.world_size} devices: "
                          f"dp = devices / (tp * pp) must be a whole number")


def _refusal(work: Workload, cluster: Cluster, global_batch: int, fixed: Fixed) -> str:
    where = f"{cluster.world_size} devices of {cluster.memory_bytes / 1e9:.1f} GB"
    if not any(True for _ in _candidates(work, cluster, global_batch, fixed)):
        return (f"no layout tp * pp * dp = {cluster.world_size} has tp dividing the heads and the node size and "
                f"dp dividing the global batch {global_batch}: change the device count or "
                f"parallel.global_batch_size")
    floor = _lower_bound(work, cluster, global_batch, fixed)
    if floor > cluster.memory_bytes:
        return (f"the model does not fit on any number of devices of {cluster.memory_bytes / 1e9:.1f} GB: even "
                f"the most frugal layout needs {floor / 1e9:.1f} GB per device; use larger devices or a "
                f"shorter data.seq_length")
    smallest = smallest_cluster(work, cluster, global_batch, fixed)
    if smallest is None:
        return f"the model does not fit on {where}, nor on up to {MAX_NODES_SEARCHED} such nodes"
    layout = smallest.layout
    return (f"the model does not fit on {where}: the smallest device count that works is "
            f"{layout.world_size} (tp {layout.tp}, pp {layout.pp}, dp {layout.dp}, micro-batch "
            f"{layout.micro_batch}, recomputation {'on' if layout.recompute_interval else 'off'}, "
            f"{smallest.peak.total / 1e9:.1f} GB per device)")


def plan_layout(config: Config, cluster: Cluster, fixed: Fixed = Fixed()) -> Plan:
    """Choose what `fixed` leaves open, validate what it fixes; ConfigError when nothing fits."""
    work = Workload.from_config(config, on_cpu=cluster.kind == "cpu")
    _check_fixed(work, cluster, fixed)
    plan = search(work, cluster, config.parallel.global_batch_size, fixed)
    if plan is None:
        raise ConfigError(_refusal(work, cluster, config.parallel.global_batch_size, fixed))
    return plan
