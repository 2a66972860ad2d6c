"""The layout planner: from a cluster and a config to (tp, pp, dp, ep, micro-batch, accumulation,
activation recomputation), following the rules that work at scale (Narayanan et al. 2021, GLM-130B):

- tensor parallelism stays inside a node: tp <= devices per node, tp divides every node's device
  count, the attention heads and the MLP width (and a mixture of experts' expert width);
- pipeline parallelism only when the model fits no other way: the smallest pp wins, and at each pp
  plain training is preferred to activation recomputation, then the smallest tp;
- context parallelism (cp, each row split over cp ranks) only when a sequence fits no other way: the
  layouts that offload nothing are tried at cp = 1, then at cp = 2, 4, ... (cp dividing the devices, and
  data.seq_length a multiple of 2 cp), and only then those that offload, at each cp in turn (_cp_ladder);
  its activations are divided as trainer/parallel/context.py divides them (launch/memory.py);
- data parallelism takes the rest: dp = world / (tp * pp * cp);
- expert parallelism (a mixture-of-experts model only) splits the routed experts over ep of the dp x cp ranks: ep
  divides dp * cp and the expert count; at each tp the smallest ep that fits wins, since ep adds no ranks but
  sends k copies of every token to other ranks and back in each MoE block (all-to-all), where tp's traffic stays
  inside a node; ZeRO-1/2 then shard the experts' states over edp = dp cp / ep, the others' over dp cp (ZeRO-3 is
  planned at ep = 1 only: it would partition each expert's weights over ranks that hold other experts);
- every global batch of the run (parallel.global_batch_size, and under batch-size warmup its start and
  increment) must be micro-batch x dp x a whole accumulation, so micro-batch x dp divides their greatest
  common divisor (Batches.unit);
- the micro-batch is the YAML's when it fits and keeps the 1F1B bubble (pp - 1) / (grad_accum + pp - 1)
  under BUBBLE_LIMIT, else the largest that does; when none does, the smallest that fits (the most
  micro-batches in flight).

What the user fixed (--tp, --pp, --ep, --micro-batch, or the same keys in the YAML / --set) is validated,
not chosen. Rank order is trainer/parallel/mesh.py's, rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp +
tp_rank (DeepSpeed's PipeModelDataParallelTopology at cp = 1), so a tensor-parallel group is adjacent ranks on
one node.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Optional

from launch.devices import Cluster, HostMemory
from launch.memory import Layout, StageMemory, Workload, stage_memory
from trainer.config import Config, expert_parallel_refusal
from trainer.engine.ds_config import effective_zero_stage
from trainer.engine.partition import blocks_per_stage
from trainer.errors import ConfigError
from trainer.model.config import ModelConfig

Zero = tuple[int, str, str]
"""(zero_stage, offload_optimizer, offload_params)."""

BUBBLE_LIMIT = 0.10
MAX_NODES_SEARCHED = 1024
MAX_CP_BOUND = 64
"""The largest context parallelism the lower bound of a refusal assumes (a 128K row in chunks of 1K)."""


@dataclass(frozen=True)
class Fixed:
    """The layout choices the user made; None = the planner chooses."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    ep: Optional[int] = None
    cp: Optional[int] = None
    micro_batch: Optional[int] = None
    recompute_interval: Optional[int] = None
    zero_stage: Optional[int] = None
    offload_optimizer: Optional[str] = None
    offload_params: Optional[str] = None
    sequence_parallel: Optional[bool] = None

    def allows(self, zero: Zero) -> bool:
        return all(fixed in (None, chosen) for fixed, chosen in
                   zip((self.zero_stage, self.offload_optimizer, self.offload_params), zero))


@dataclass(frozen=True)
class Batches:
    """The global batches a run steps through: parallel.global_batch_size, and under batch-size warmup
    (optim.batch_size_warmup_*) the ramp's start and increment."""

    final: int
    start: int = 0
    increment: int = 0

    @classmethod
    def of(cls, config: Config) -> "Batches":
        optim, final = config.optim, config.parallel.global_batch_size
        if optim.batch_size_warmup_steps <= 0:
            return cls(final)
        return cls(final, optim.batch_size_warmup_start, optim.batch_size_warmup_increment or optim.batch_size_warmup_start)

    @property
    def unit(self) -> int:
        """The largest number every batch of the run is a multiple of: micro-batch x dp must divide it."""
        return math.gcd(self.final, self.start, self.increment)

    def __str__(self) -> str:
        if not self.start:
            return f"the global batch {self.final}"
        return (f"{self.unit}, the greatest common divisor of the global batch {self.final} and the batch-size "
                f"warmup's start {self.start} and increment {self.increment}")


@dataclass(frozen=True)
class Plan:
    layout: Layout
    cluster: Cluster
    blocks: list[int]
    stages: list[StageMemory]
    global_batch: int
    host_memory: HostMemory
    notes: tuple[str, ...] = ()
    """What the plan changed of the YAML that a reader would not expect (its micro-batch), one line each."""

    @property
    def host_per_node(self) -> int:
        """Bytes of offloaded states on the fullest node: one rank's times the ranks of a node."""
        return max(stage.host for stage in self.stages) * max(slots for _, slots in self.cluster.hosts)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total)

    def overrides(self) -> list[str]:
        """The layout as glm-train `--set` values."""
        layout = self.layout
        return [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", f"parallel.cp={layout.cp}",
                f"parallel.ep={layout.ep}",
                f"parallel.micro_batch_size={layout.micro_batch}",
                f"parallel.recompute_interval={layout.recompute_interval}",
                f"parallel.sequence_parallel={str(layout.sequence_parallel).lower()}",
                f"optim.zero_stage={layout.zero_stage}", f"optim.offload_optimizer={layout.offload_optimizer}",
                f"optim.offload_params={layout.offload_params}"]

    def ranks(self) -> list[dict]:
        """Host, device, (pp, dp, cp, tp) and (ep, edp) coordinates and blocks [first, stop) of every global rank."""
        starts = [sum(self.blocks[:stage]) for stage in range(len(self.blocks))]
        table = []
        for rank, (host, device) in enumerate(self.cluster.rank_devices()):
            at = self.layout.coordinates(rank)
            table.append({"rank": rank, "host": host, "device": device, "pp_rank": at["pp"],
                          "dp_rank": at["dp"], "cp_rank": at["cp"], "tp_rank": at["tp"], "ep_rank": at["ep"],
                          "edp_rank": at["edp"], "blocks": [starts[at["pp"]], starts[at["pp"]] + self.blocks[at["pp"]]]})
        return table

    def to_dict(self) -> dict:
        layout, peak = self.layout, self.peak
        return {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "cp": layout.cp, "ep": layout.ep,
                "world_size": layout.world_size,
                "micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum,
                "global_batch": self.global_batch, "recompute_interval": layout.recompute_interval,
                "sequence_parallel": layout.sequence_parallel,
                "zero_stage": layout.zero_stage, "offload_optimizer": layout.offload_optimizer,
                "offload_params": layout.offload_params,
                "pipeline_bubble": round(bubble(layout), 4), "blocks_per_stage": self.blocks,
                "devices": self.cluster.to_dict(),
                "memory": {"per_gpu_estimate_bytes": peak.total, "per_gpu_estimate_gb": round(peak.total / 1e9, 2),
                           "capacity_gb": round(self.cluster.memory_bytes / 1e9, 2), "peak_stage": peak.stage,
                           "stages": [stage.to_dict() for stage in self.stages],
                           "host_per_node_estimate_gb": round(self.host_per_node / 1e9, 2),
                           "host": self.host_memory.to_dict()},
                "overrides": self.overrides(), "notes": list(self.notes), "ranks": self.ranks()}


def bubble(layout: Layout) -> float:
    """Idle fraction of a 1F1B pipeline step: (pp - 1) / (grad_accum + pp - 1)."""
    return (layout.pp - 1) / (layout.grad_accum + layout.pp - 1)


def estimate(work: Workload, layout: Layout) -> list[StageMemory]:
    """The memory estimate of every pipeline stage of a layout."""
    blocks = blocks_per_stage(work.model.num_layers, layout.pp)
    return [stage_memory(work, layout, stage, count) for stage, count in enumerate(blocks)]


def sequence_parallel(work: Workload, fixed: Fixed, tp: int, cp: int = 1) -> bool:
    """Sequence parallelism wherever tp > 1 allows it (it divides the activations outside attention and the MLP by
    tp at the communication volume of tensor parallelism), unless the user fixed it (off, or where allowed on);
    each rank's s / cp tokens of a row must split over tp."""
    allowed = tp > 1 and work.seq_length % (tp * cp) == 0
    return allowed and fixed.sequence_parallel in (None, True)


def _fits(work: Workload, layout: Layout, cluster: Cluster, host: HostMemory) -> bool:
    stages = estimate(work, layout)
    ranks_per_node = max(slots for _, slots in cluster.hosts)
    return (max(stage.total for stage in stages) <= cluster.memory_bytes
            and max(stage.host for stage in stages) * ranks_per_node <= host.bytes)


def _tp_choices(work: Workload, cluster: Cluster, fixed: Fixed) -> list[int]:
    if fixed.tp is not None:
        return [fixed.tp]
    model = work.model
    return [tp for tp in range(1, cluster.devices_per_node + 1)
            if model.num_attention_heads % tp == 0 and model.num_kv_heads % tp == 0 and model.ffn_size % tp == 0
            and (not model.moe_num_experts or model.moe_ffn_size % tp == 0)
            and all(slots % tp == 0 for _, slots in cluster.hosts)]


def _choose_micro(work: Workload, layout: Layout, batches: Batches, fixed: Fixed, cluster: Cluster,
                  host: HostMemory, preferred: Optional[int]) -> Optional[Layout]:
    """The micro-batch rule of the module docstring, among the divisors of batches.unit / dp (`preferred`: the
    YAML's); `layout` gives everything else."""
    per_rank, unit = batches.final // layout.dp, batches.unit // layout.dp
    sizes = [fixed.micro_batch] if fixed.micro_batch else [m for m in range(1, unit + 1) if unit % m == 0]
    fitting = []
    for micro in sizes:  # memory grows with the micro-batch: stop at the first that does not fit
        candidate = dataclasses.replace(layout, micro_batch=micro, grad_accum=per_rank // micro)
        if unit % micro or not _fits(work, candidate, cluster, host):
            break
        fitting.append(candidate)
    if not fitting:
        return None
    short_bubble = [layout for layout in fitting if bubble(layout) <= BUBBLE_LIMIT]
    kept = [layout for layout in short_bubble if layout.micro_batch == preferred]
    return (kept or short_bubble or fitting[:1])[-1]


def _ladder(work: Workload, cluster: Cluster, fixed: Fixed, nvme: bool) -> Iterator[tuple[int, list[Zero]]]:
    """(pp, ZeRO choices) rung by rung, in the module docstring's order, keeping what `fixed` allows."""
    plain, pipelines = ("none", "none"), range(2, work.model.num_layers + 1)
    rungs = [(1, [(1, *plain), (2, *plain)])] + [(pp, [(1, *plain)]) for pp in pipelines] + [(1, [(3, *plain)])]
    if cluster.kind != "cpu":  # a CPU rank's device is the host already
        offloads = [("cpu", "none")] + [("nvme", "none")] * nvme + [("cpu", "cpu")] + \
            [("nvme", "cpu"), ("nvme", "nvme")] * nvme
        rungs += [(1, [(3, *offload)]) for offload in offloads]
    if (fixed.zero_stage, fixed.offload_optimizer, fixed.offload_params) != (None, None, None):
        off = [(stage, "cpu", "none") for stage in (1, 2)]  # NVMe swapping is ZeRO-3's only
        rungs += [(1, [(0, *plain)] + off)] + [(pp, [(0, *plain), (1, "cpu", "none")]) for pp in pipelines]
    for pp, zeros in rungs:
        allowed = [zero for zero in zeros if fixed.allows(zero)]
        if allowed and fixed.pp in (None, pp):
            yield pp, allowed


def _ep_choices(work: Workload, fixed: Fixed, dp_cp: int) -> list[int]:
    """The expert-parallel sizes for dp_cp = dp * cp ranks, smallest first: the divisors of dp_cp that divide the
    expert count (1 for a dense model), or the fixed one when it is among them."""
    experts = work.model.moe_num_experts
    choices = [ep for ep in range(1, dp_cp + 1) if dp_cp % ep == 0 and (experts % ep == 0 if experts else ep == 1)]
    return choices if fixed.ep is None else [ep for ep in choices if ep == fixed.ep]


def _cp_choices(work: Workload, cluster: Cluster, fixed: Fixed) -> list[int]:
    """The context-parallel sizes to try, in order: 1, then the powers of two that divide the devices and cut
    every row into 2 cp equal chunks (trainer/parallel/context.py)."""
    if fixed.cp is not None:
        return [fixed.cp]
    sizes, cp = [1], 2
    while cp <= cluster.world_size:
        if cluster.world_size % cp == 0 and work.seq_length % (2 * cp) == 0:
            sizes.append(cp)
        cp *= 2
    return sizes


def _cp_ladder(work: Workload, cluster: Cluster, batches: Batches, fixed: Fixed,
               nvme: bool) -> Iterator[tuple[int, int, list[Zero]]]:
    """(cp, pp, ZeRO choices): the ladder's rungs that offload nothing at cp = 1, 2, 4, ..., then those that
    offload at each cp: a longer sequence is split over more devices before its states leave them. cp > 1 is
    for memory only: where no layout at cp = 1 can take the batches (dp or the fixed micro-batch does not
    divide them), the refusal says so rather than a cp that happens to shrink dp."""
    rungs = list(_ladder(work, cluster, fixed, nvme))
    cps = _cp_choices(work, cluster, fixed) if fixed.cp or _batches_fit(work, cluster, batches, fixed, rungs) else [1]
    for offloads in (False, True):
        for cp in cps:
            for pp, zeros in rungs:
                kept = [zero for zero in zeros if (zero[1:] != ("none", "none")) == offloads]
                if kept:
                    yield cp, pp, kept


def _batches_fit(work: Workload, cluster: Cluster, batches: Batches, fixed: Fixed, rungs: list) -> bool:
    """Whether some layout at cp = 1 takes every batch of the run (dp and the fixed micro-batch divide them)."""
    return any(not fixed.micro_batch or (batches.unit // dp) % fixed.micro_batch == 0
               for pp, _ in rungs for _, dp, _ in _candidates(work, cluster, batches, fixed, pp))


def _candidates(work: Workload, cluster: Cluster, batches: Batches, fixed: Fixed, pp: int,
                cp: int = 1) -> Iterator[tuple[int, int, int]]:
    """(tp, dp, ep) with tp * pp * cp * dp = the world size, dp dividing every batch of the run and ep dividing
    dp * cp and the experts, smallest tp first, then smallest ep."""
    world = cluster.world_size
    for tp in _tp_choices(work, cluster, fixed):
        if world % (tp * pp * cp) == 0 and batches.unit % (world // (tp * pp * cp)) == 0:
            dp = world // (tp * pp * cp)
            for ep in _ep_choices(work, fixed, dp * cp):
                yield tp, dp, ep


def search(work: Workload, cluster: Cluster, batches: Batches, host: HostMemory, fixed: Fixed = Fixed(),
           nvme: bool = False, preferred_micro: Optional[int] = None) -> Optional[Plan]:
    """The preferred layout that fits, or None; `nvme`: optim.nvme_path is set, NVMe offload may be planned;
    `preferred_micro`: the YAML's micro-batch, kept when the rule allows."""
    intervals = [fixed.recompute_interval] if fixed.recompute_interval is not None else [0, 1]
    for cp, pp, zeros in _cp_ladder(work, cluster, batches, fixed, nvme):
        candidates = list(_candidates(work, cluster, batches, fixed, pp, cp))
        for interval in intervals:
            for tp, dp, ep in candidates:
                for stage, offload_optimizer, offload_params in zeros:
                    if offload_optimizer != "none" and effective_zero_stage(stage, work.precision, dp * cp) == 0:
                        continue  # an fp32 ZeRO-1 at dp x cp = 1 runs stage 0, which offloads nothing
                    if expert_parallel_refusal(ep, stage, work.precision, offload_optimizer, pp) is not None:
                        continue  # a layout the config check refuses (trainer/config.py states the rule)
                    layout = Layout(tp, pp, dp, 1, 1, interval, stage, offload_optimizer, offload_params, cp=cp,
                                    ep=ep, sequence_parallel=sequence_parallel(work, fixed, tp, cp))
                    chosen = _choose_micro(work, layout, batches, fixed, cluster, host, preferred_micro)
                    if chosen is not None:
                        return Plan(chosen, cluster, blocks_per_stage(work.model.num_layers, pp),
                                    estimate(work, chosen), batches.final, host)
    return None


def _hypothetical(cluster: Cluster, world: int) -> Cluster:
    """A cluster of `world` devices shaped like this one: a part of one node, or whole nodes."""
    per_node = cluster.devices_per_node
    if world <= per_node:
        return Cluster((("node0", world),), cluster.memory_bytes, cluster.kind, cluster.source)
    return Cluster(tuple((f"node{i}", per_node) for i in range(world // per_node)),
                   cluster.memory_bytes, cluster.kind, cluster.source)


def smallest_cluster(work: Workload, cluster: Cluster, batches: Batches, host: HostMemory, fixed: Fixed = Fixed(),
                     nvme: bool = False) -> Optional[Plan]:
    """The plan on the fewest devices of this cluster's kind and memory (and nodes of this host memory)
    that fits (None: up to MAX_NODES_SEARCHED nodes, nothing does)."""
    per_node = cluster.devices_per_node
    for world in list(range(1, per_node)) + [per_node * n for n in range(1, MAX_NODES_SEARCHED + 1)]:
        plan = search(work, _hypothetical(cluster, world), batches, host, fixed, nvme)
        if plan is not None:
            return plan
    return None


def _lower_bound(work: Workload, cluster: Cluster, global_batch: int, fixed: Fixed) -> int:
    """Bytes per device of the most memory-frugal layout this node shape allows among what `fixed` leaves
    open: the largest tp, micro-batch 1, recomputation, the states sharded over the whole global batch, the
    experts over the largest ep that divides it (and the experts), and either one block per stage (ZeRO-1) or
    one stage with ZeRO-3 (its weights offloaded on GPUs), and the largest context parallelism a row allows up
    to MAX_CP_BOUND."""
    tp = max(_tp_choices(work, cluster, fixed), default=1)
    row_splits = [2 ** i for i in range(MAX_CP_BOUND.bit_length()) if work.seq_length % 2 ** (i + 1) == 0]
    cp = fixed.cp or max([1] + row_splits)
    interval = 1 if fixed.recompute_interval is None else fixed.recompute_interval
    micro, offload = fixed.micro_batch or 1, "none" if cluster.kind == "cpu" else "cpu"
    frugal = [(fixed.pp or work.model.num_layers, (1, "none", "none"))]
    frugal += [(1, (3, offload, offload)), (1, (3, "none", "none"))] if fixed.pp in (None, 1) else []
    ep = (fixed.ep or math.gcd(work.model.moe_num_experts, global_batch)) if work.model.moe_num_experts else 1
    sp = sequence_parallel(work, fixed, tp, cp)
    totals = [max(stage.total for stage in estimate(work, Layout(tp, pp, global_batch, micro, 1, interval, *zero,
                                                                 cp=cp, ep=1 if zero[0] == 3 else ep,
                                                                 sequence_parallel=sp)))
              for pp, zero in frugal if fixed.allows(zero)]
    return min(totals, default=0)


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
    if fixed.cp is not None and (fixed.cp < 1 or cluster.world_size % fixed.cp or work.seq_length % (2 * fixed.cp)):
        raise ConfigError(f"cp={fixed.cp} must be >= 1, divide the {cluster.world_size} devices and cut "
                          f"data.seq_length={work.seq_length} into 2 cp equal chunks: choose another parallel.cp or "
                          f"leave it to the planner")
    if fixed.tp and fixed.pp and cluster.world_size % (fixed.tp * fixed.pp):
        raise ConfigError(f"tp * pp = {fixed.tp} * {fixed.pp} does not divide the {cluster.world_size} devices: "
                          f"dp = devices / (tp * pp) must be a whole number")
    _check_fixed_ep(model, cluster, fixed)


def _check_fixed_ep(model: ModelConfig, cluster: Cluster, fixed: Fixed) -> None:
    if fixed.ep is None or fixed.ep == 1:
        return
    if fixed.ep < 1:
        raise ConfigError(f"ep must be >= 1, got {fixed.ep}")
    if not model.moe_num_experts:
        raise ConfigError(f"ep={fixed.ep} splits the routed experts, and this model has none (model.moe_num_experts "
                          f"= 0): leave ep at 1")
    if model.moe_num_experts % fixed.ep:
        raise ConfigError(f"ep={fixed.ep} does not divide the {model.moe_num_experts} experts: every expert-parallel "
                          f"rank holds the same number of whole experts; choose ep among the divisors of "
                          f"{model.moe_num_experts}")
    if fixed.tp and fixed.pp and (cluster.world_size // (fixed.tp * fixed.pp)) % fixed.ep:
        dp = cluster.world_size // (fixed.tp * fixed.pp)
        raise ConfigError(f"ep={fixed.ep} does not divide dp = {dp} (tp {fixed.tp}, pp {fixed.pp}): expert "
                          f"parallelism is carved out of the data-parallel ranks; choose an ep that divides {dp}")


def describe_zero(layout: Layout) -> str:
    """'ZeRO-3, optimizer offload cpu, weights offload cpu' and the like."""
    text = f"ZeRO-{layout.zero_stage}"
    if layout.offload_optimizer != "none":
        text += f", optimizer offload {layout.offload_optimizer}"
    if layout.offload_params != "none":
        text += f", weights offload {layout.offload_params}"
    return text


def _refusal(work: Workload, cluster: Cluster, batches: Batches, host: HostMemory, fixed: Fixed, nvme: bool) -> str:
    where = f"{cluster.world_size} devices of {cluster.memory_bytes / 1e9:.1f} GB"
    layouts = [(tp, pp, dp) for cp, pp, _ in _cp_ladder(work, cluster, batches, fixed, nvme)
               for tp, dp, _ in _candidates(work, cluster, batches, fixed, pp, cp)]
    if not layouts:
        experts = f" and a divisor ep={fixed.ep} of dp" if fixed.ep else ""
        return (f"no layout tp * pp * dp = {cluster.world_size} has tp dividing the heads and the node size and "
                f"dp dividing {batches}{experts}: change the device count, parallel.global_batch_size or the "
                f"batch-size warmup (optim.batch_size_warmup_start/_increment)")
    if fixed.micro_batch and all((batches.unit // dp) % fixed.micro_batch for _, _, dp in layouts):
        tp, pp, dp = layouts[0]
        return (f"micro-batch {fixed.micro_batch} x dp {dp} (tp {tp}, pp {pp}) does not divide {batches}: fix a "
                f"micro-batch that divides {batches.unit // dp}, or let glm-launch choose it")
    smallest = smallest_cluster(work, cluster, batches, host, fixed, nvme)
    more = "more devices" if smallest is None else f"{smallest.layout.world_size} devices ({_summary(smallest)})"
    unbounded = search(work, cluster, batches, HostMemory(2 ** 62, "unbounded"), fixed, nvme)
    if unbounded is not None:
        return (f"the model fits on {where} only with {describe_zero(unbounded.layout)}, which needs "
                f"{unbounded.host_per_node / 1e9:.1f} GB of host memory per node, more than the "
                f"{host.bytes / 1e9:.1f} GB there ({host.source}): use nodes with more host memory "
                f"(--host-memory), NVMe offload (set optim.nvme_path), or {more}")
    floor = _lower_bound(work, cluster, batches.final, fixed)
    if floor > cluster.memory_bytes:
        return (f"the model does not fit on any number of devices of {cluster.memory_bytes / 1e9:.1f} GB: even "
                f"the most frugal layout needs {floor / 1e9:.1f} GB per device; use larger devices or a "
                f"shorter data.seq_length")
    if smallest is None:
        return f"the model does not fit on {where}, nor on up to {MAX_NODES_SEARCHED} such nodes"
    return f"the model does not fit on {where}: the smallest device count that works is {more}"


def _summary(plan: Plan) -> str:
    layout = plan.layout
    context = f"cp {layout.cp}, " if layout.cp > 1 else ""
    experts = f"ep {layout.ep}, " if layout.ep > 1 else ""
    return (f"tp {layout.tp}, pp {layout.pp}, {context}dp {layout.dp}, {experts}micro-batch {layout.micro_batch}, "
            f"recomputation {'on' if layout.recompute_interval else 'off'}, "
            f"{'sequence parallelism, ' * layout.sequence_parallel}{describe_zero(layout)}, "
            f"{plan.peak.total / 1e9:.1f} GB per device")


def plan_layout(config: Config, cluster: Cluster, host: HostMemory, fixed: Fixed = Fixed()) -> Plan:
    """Choose what `fixed` leaves open, validate what it fixes; ConfigError when nothing fits."""
    work = Workload.from_config(config, on_cpu=cluster.kind == "cpu")
    _check_fixed(work, cluster, fixed)
    if fixed.sequence_parallel is None and (config.train.eval_tasks or config.model.moe_num_experts):
        # eval_tasks: config.py refuses sequence parallelism with them. MoE: allowed (GLMMoE gathers the row), but
        # not planned by default: the plans of docs/LAUNCH.md were made without it, and the memory model's MoE
        # blocks under it are not yet checked against a measured run; --set parallel.sequence_parallel=true asks
        fixed = dataclasses.replace(fixed, sequence_parallel=False)
    batches, nvme, yaml_micro = Batches.of(config), bool(config.optim.nvme_path), config.parallel.micro_batch_size
    plan = search(work, cluster, batches, host, fixed, nvme, yaml_micro)
    if plan is None:
        raise ConfigError(_refusal(work, cluster, batches, host, fixed, nvme))
    if fixed.micro_batch is None and plan.layout.micro_batch != yaml_micro:
        plan = dataclasses.replace(plan, notes=(_micro_note(work, plan, batches, yaml_micro, host),))
    return plan


def _micro_note(work: Workload, plan: Plan, batches: Batches, yaml_micro: int, host: HostMemory) -> str:
    """Why the plan's micro-batch is not the YAML's (one line)."""
    layout = plan.layout
    unit = batches.unit // layout.dp
    kept = dataclasses.replace(layout, micro_batch=yaml_micro, grad_accum=max(1, batches.final // layout.dp // yaml_micro))
    if unit % yaml_micro:
        why = f"micro-batch x dp {yaml_micro} x {layout.dp} does not divide {batches}"
    elif not _fits(work, kept, plan.cluster, host):
        why = "it does not fit in memory at this layout"
    else:
        why = f"its pipeline bubble {bubble(kept):.0%} is above {BUBBLE_LIMIT:.0%}"
    return f"micro-batch {layout.micro_batch} instead of the YAML's {yaml_micro}: {why}"
