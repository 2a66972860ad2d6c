"""The layout planner: partition, the published layouts, refusals and DeepSpeed's rank order."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from launch.devices import Cluster, HostMemory
from launch.memory import Layout, Workload
from launch.planner import Fixed, _ladder, estimate, plan_layout
from trainer.engine.partition import blocks_per_stage as partition_blocks
from trainer.config import load_config
from trainer.errors import ConfigError

GB = 10 ** 9
HOST = HostMemory(2000 * GB, "--host-memory")
"""A DGX-like node's host memory (2 TB)."""
NO_HOST = HostMemory(1 * GB, "--host-memory")
"""Too little host memory for any offload: the plans of devices alone."""


def nodes(count: int, per_node: int, memory_gb: float) -> Cluster:
    return Cluster(tuple((f"node{i}", per_node) for i in range(count)), int(memory_gb * GB), "cuda", "hostfile")


def test_glm_130b_partition_is_9_times_8_minus_2():
    assert partition_blocks(70, 8) == [8, 9, 9, 9, 9, 9, 9, 8]


def test_partition_small_cases():
    assert partition_blocks(4, 1) == [4]
    assert partition_blocks(4, 2) == [2, 2]
    assert partition_blocks(5, 2) == [3, 2]  # 7 units: the left-over unit goes to the first stage
    assert partition_blocks(3, 3) == [1, 1, 1]  # balancing would empty an end stage: dealt evenly
    with pytest.raises(ConfigError, match="between 1 and model.num_layers"):
        partition_blocks(4, 5)


@given(st.integers(1, 200), st.integers(1, 64))
def test_partition_covers_every_block_once_and_balances(num_layers, pp):
    if pp > num_layers:
        return
    blocks = partition_blocks(num_layers, pp)
    assert len(blocks) == pp and sum(blocks) == num_layers and min(blocks) >= 1
    units = list(blocks)
    if pp > 1 and blocks[0] < max(blocks):  # the balanced form: the ends carry one unit of embedding/output
        units[0] += 1
        units[-1] += 1
    assert max(units) - min(units) <= 1


def test_glm_130b_on_96_nodes_of_8_a100_40gb_fits():
    config = load_config("configs/glm-130b.yaml")
    cluster = nodes(96, 8, 40)
    plan = plan_layout(config, cluster, HOST)
    layout = plan.layout
    # The planner's rule (smallest pp, tp up to the node) gives tp 8, pp 3; docs/LAUNCH.md compares
    # it with the tp 4, pp 8, dp 24 that GLM-130B ran.
    assert (layout.tp, layout.pp, layout.dp) == (8, 3, 32)
    assert layout.recompute_interval == 1
    assert layout.micro_batch * layout.grad_accum * layout.dp == 4224
    assert plan.peak.total <= cluster.memory_bytes
    assert plan.blocks == [23, 24, 23]


def test_glm_130b_published_layout_fits_the_memory_model():
    config = load_config("configs/glm-130b.yaml")
    plan = plan_layout(config, nodes(96, 8, 40), HOST, Fixed(tp=4, pp=8, micro_batch=1))
    assert (plan.layout.dp, plan.layout.grad_accum) == (24, 176)
    assert plan.peak.total <= 40 * GB
    assert plan.blocks == [8, 9, 9, 9, 9, 9, 9, 8]


def test_glm_130b_on_one_node_is_refused_with_the_smallest_gpu_count():
    """Without host memory for offload, devices alone: 64 GPUs of 40 GB (a pipeline of 8 stages; 72 and 9 stages
    without sequence parallelism, which the planner turns on with tp)."""
    config = load_config("configs/glm-130b.yaml")
    with pytest.raises(ConfigError, match=r"more than the 1\.0 GB there \(--host-memory\): .* or 64 devices "
                                          r"\(tp 8, pp 8, dp 1, micro-batch 2, recomputation on, sequence "
                                          r"parallelism, ZeRO-1, "):
        plan_layout(config, nodes(1, 8, 40), NO_HOST)
    # ... and 64 GPUs do fit, 56 do not.
    assert plan_layout(config, nodes(8, 8, 40), NO_HOST).layout.world_size == 64
    with pytest.raises(ConfigError, match=r"is 64 devices \(tp 8, pp 8"):
        plan_layout(config, nodes(7, 8, 40), NO_HOST)


def test_glm_130b_on_one_node_needs_more_host_memory_than_a_node_has():
    with pytest.raises(ConfigError, match=r"fits on 8 devices of 40\.0 GB only with ZeRO-3, optimizer offload cpu, "
                                          r"weights offload cpu, which needs 2831\.3 GB of host memory per node, more "
                                          r"than the 2000\.0 GB there \(--host-memory\): use nodes with more host "
                                          r"memory \(--host-memory\)"):
        plan_layout(load_config("configs/glm-130b.yaml"), nodes(1, 8, 40), HOST)


def test_glm_large_on_one_gpu_is_1_1_1():
    plan = plan_layout(load_config("configs/glm-large.yaml"), nodes(1, 1, 40), HOST)
    assert (plan.layout.tp, plan.layout.pp, plan.layout.dp) == (1, 1, 1)
    assert plan.layout.recompute_interval == 0


def test_glm_base_on_eight_gpus_is_data_parallel_8():
    plan = plan_layout(load_config("configs/glm-base.yaml"), nodes(1, 8, 40), HOST)
    assert (plan.layout.tp, plan.layout.pp, plan.layout.dp) == (1, 1, 8)
    assert plan.layout.micro_batch * plan.layout.grad_accum * 8 == 1024


def test_tp_is_chosen_among_the_divisors_of_the_key_value_heads():
    """GLM-4-9B's 2 key/value heads: tp 4 or 8 would split one head over ranks."""
    plan = plan_layout(load_config("configs/glm-4-9b.yaml"), nodes(1, 8, 80), HOST)
    assert plan.layout.tp in (1, 2)


def test_tp_not_dividing_the_heads_is_refused():
    with pytest.raises(ConfigError, match="num_attention_heads=12 is not divisible by parallel.tp=5"):
        plan_layout(load_config("configs/glm-base.yaml"), nodes(1, 8, 40), HOST, Fixed(tp=5))


def test_tp_larger_than_a_node_or_straddling_nodes_is_refused():
    config = load_config("configs/glm-base.yaml")
    with pytest.raises(ConfigError, match="tp=12 is larger than the 8 devices per node"):
        plan_layout(config, nodes(2, 8, 40), HOST, Fixed(tp=12))
    with pytest.raises(ConfigError, match="must not straddle nodes"):
        plan_layout(config, nodes(2, 6, 40), HOST, Fixed(tp=4))


def test_fixed_values_are_kept():
    plan = plan_layout(load_config("configs/glm-base.yaml"), nodes(2, 8, 40), HOST, Fixed(tp=2, pp=2, micro_batch=4))
    assert (plan.layout.tp, plan.layout.pp, plan.layout.dp, plan.layout.micro_batch) == (2, 2, 4, 4)
    assert plan.layout.grad_accum == 1024 // (4 * 4)


def test_pipeline_only_when_needed():
    """GLM-10B on 4 nodes: pp 1 on 80 GB GPUs; on 9 GB GPUs one stage does not fit even with tp 8
    and checkpointing, so the planner takes two stages before ZeRO-3."""
    config = load_config("configs/glm-10b.yaml")
    assert plan_layout(config, nodes(4, 8, 80), HOST).layout.pp == 1
    small = plan_layout(config, nodes(4, 8, 9), HOST).layout
    assert (small.tp, small.pp, small.dp, small.zero_stage) == (8, 2, 2, 1)
    # pp = 1 fixed: ZeRO-3 alone does not fit 9 GB, with the optimizer offloaded it does
    fixed = plan_layout(config, nodes(4, 8, 9), HOST, Fixed(pp=1)).layout
    assert (fixed.pp, fixed.zero_stage, fixed.offload_optimizer, fixed.offload_params) == (1, 3, "cpu", "none")
    with pytest.raises(ConfigError, match=r"fits on 32 devices of 9\.0 GB only with ZeRO-3, optimizer offload cpu"):
        plan_layout(config, nodes(4, 8, 9), NO_HOST, Fixed(pp=1))


def test_glm_10b_on_one_80gb_gpu_is_zero_3_with_the_optimizer_offloaded():
    plan = plan_layout(load_config("configs/glm-10b.yaml"), nodes(1, 1, 80), HOST)
    layout = plan.layout
    assert (layout.tp, layout.pp, layout.dp) == (1, 1, 1)
    assert (layout.zero_stage, layout.offload_optimizer, layout.offload_params) == (3, "cpu", "none")
    # host: 1.1 * (16 + 2) bytes of each of the 9 880 674 304 parameters (master, m, v, fp32 and bf16 gradients)
    assert plan.host_per_node == pytest.approx(1.1 * 18 * 9_880_674_304, rel=1e-6)
    assert plan.peak.total <= 80 * GB and plan.peak.optimizer_states == 0
    assert plan.overrides()[-3:] == ["optim.zero_stage=3", "optim.offload_optimizer=cpu", "optim.offload_params=none"]
    summary = plan.to_dict()
    assert (summary["zero_stage"], summary["offload_optimizer"], summary["offload_params"]) == (3, "cpu", "none")
    assert summary["memory"]["host_per_node_estimate_gb"] == 195.64
    assert summary["memory"]["host"] == {"capacity_gb": 2000.0, "source": "--host-memory"}


def test_offload_that_exceeds_the_host_memory_is_refused():
    small = HostMemory(100 * GB, "--host-memory")
    with pytest.raises(ConfigError, match=r"needs 195\.6 GB of host memory per node, more than the 100\.0 GB there "
                                          r"\(--host-memory\): use nodes with more host memory \(--host-memory\), "
                                          r"NVMe offload \(set optim\.nvme_path\), or 2 devices"):
        plan_layout(load_config("configs/glm-10b.yaml"), nodes(1, 1, 80), small)


def test_no_offload_and_no_zero_3_when_the_model_fits_without():
    plan = plan_layout(load_config("configs/glm-1.3b.yaml"), nodes(1, 8, 80), HOST)
    assert (plan.layout.zero_stage, plan.layout.offload_optimizer, plan.layout.offload_params) == (1, "none", "none")
    assert plan.host_per_node == 0


def test_zero_2_before_recomputation_and_tensor_parallelism():
    """GLM-10B on 8 GPUs of 64 GB: ZeRO-1 fits only with tp 2; ZeRO-2 at tp 1, without recomputation.
    On 72 GB ZeRO-1 fits at tp 1 and is kept (the least gradient traffic)."""
    plan = plan_layout(load_config("configs/glm-10b.yaml"), nodes(1, 8, 64), HOST)
    assert (plan.layout.tp, plan.layout.pp, plan.layout.zero_stage, plan.layout.recompute_interval) == (1, 1, 2, 0)
    assert plan_layout(load_config("configs/glm-10b.yaml"), nodes(1, 8, 72), HOST).layout.zero_stage == 1


@pytest.mark.parametrize("fixed", [Fixed(), Fixed(zero_stage=1), Fixed(offload_optimizer="cpu")])
def test_zero_2_and_3_never_meet_a_pipeline(fixed):
    work = Workload.from_config(load_config("configs/glm-10b.yaml"))
    rungs = list(_ladder(work, nodes(1, 8, 80), fixed, nvme=True))
    assert rungs and all(stage <= 1 for pp, zeros in rungs if pp > 1 for stage, _, _ in zeros)
    for memory in (9, 20, 40):
        layout = plan_layout(load_config("configs/glm-10b.yaml"), nodes(4, 8, memory), HOST).layout
        assert layout.pp == 1 or layout.zero_stage <= 1


def test_fixed_zero_stage_and_offload_are_kept():
    config = load_config("configs/glm-10b.yaml")
    two = plan_layout(config, nodes(1, 8, 80), HOST, Fixed(zero_stage=2)).layout
    assert (two.pp, two.zero_stage, two.offload_optimizer) == (1, 2, "none")
    # off the ladder: ZeRO-2 with the optimizer on the host (ZeRO-Offload) for one GPU
    offload = plan_layout(config, nodes(1, 1, 80), HOST, Fixed(zero_stage=2, offload_optimizer="cpu")).layout
    assert (offload.zero_stage, offload.offload_optimizer, offload.offload_params) == (2, "cpu", "none")
    with pytest.raises(ConfigError, match="does not fit on 1 devices"):
        plan_layout(config, nodes(1, 1, 80), HOST, Fixed(offload_optimizer="none"))


def test_rank_table_follows_deepspeed_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    config = load_config("configs/glm-base.yaml")
    plan = plan_layout(config, nodes(2, 8, 40), HOST, Fixed(tp=2, pp=2))
    topology = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=4)
    for row in plan.ranks():
        coord = topology.get_coord(row["rank"])
        assert (row["pp_rank"], row["dp_rank"], row["tp_rank"]) == (coord.pipe, coord.data, coord.model)
        assert row["host"] == f"node{row['rank'] // 8}" and row["device"] == row["rank"] % 8
        assert row["blocks"] == ([0, 6] if coord.pipe == 0 else [6, 12])


def test_memory_grows_with_micro_batch_and_checkpointing_saves_it():
    work = Workload.from_config(load_config("configs/glm-10b.yaml"))

    def peak(micro: int, interval: int) -> int:
        return max(stage.total for stage in estimate(work, Layout(4, 4, 1, micro, 16, interval)))

    assert peak(1, 0) < peak(2, 0) < peak(4, 0)
    assert peak(4, 1) < peak(4, 0)
