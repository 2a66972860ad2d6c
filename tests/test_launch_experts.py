"""Expert parallelism in the planner and the memory model: ep chosen (the smallest that fits, dividing dp and the
experts) or validated when fixed; the routed experts' weights and gradients split by ep, their ZeRO states by
edp = dp / ep; the stages of GLM-4.5 hold every parameter once (at pp > 1 also the MTP layer's copy of the word
embedding); MoE activations by hand."""
from __future__ import annotations

import dataclasses

import pytest

from launch.devices import Cluster, HostMemory
from launch.memory import (Layout, Workload, moe_activation_bytes, persistent_parameters, stage_expert_parameters,
                           stage_memory, stage_parameters, state_bytes)
from launch.planner import Fixed, _fits, plan_layout
from trainer.config import load_config, with_overrides
from trainer.engine.partition import blocks_per_stage
from trainer.errors import ConfigError
from trainer.model.config import ModelConfig

GB = 10 ** 9
HOST = HostMemory(2000 * GB, "--host-memory")


def nodes(count: int, per_node: int, memory_gb: float) -> Cluster:
    return Cluster(tuple((f"node{i}", per_node) for i in range(count)), int(memory_gb * GB), "cuda", "hostfile")


def test_glm_4_5_on_64_nodes_plans_the_smallest_ep_that_fits():
    config = load_config("configs/glm-4.5.yaml")
    plan = plan_layout(config, nodes(64, 8, 80), HOST)
    layout = plan.layout
    assert layout.ep > 1 and 160 % layout.ep == 0 and layout.dp % layout.ep == 0
    assert plan.peak.total <= 80 * GB
    work = Workload.from_config(config)
    smaller = [ep for ep in range(1, layout.ep) if 160 % ep == 0 and layout.dp % ep == 0]
    for ep in smaller:  # at the chosen tp, pp, recomputation and ZeRO stage, no smaller ep fits
        assert not _fits(work, dataclasses.replace(layout, ep=ep), plan.cluster, HOST)
    assert f"parallel.ep={layout.ep}" in plan.overrides()
    summary = plan.to_dict()
    assert summary["ep"] == layout.ep
    rank = summary["ranks"][layout.tp * 3]  # dp_rank 3 of pp stage 0: ep_rank 3, edp_rank 0 (ep > 3)
    assert (rank["dp_rank"], rank["ep_rank"], rank["edp_rank"]) == (3, 3 % layout.ep, 3 // layout.ep)


def test_a_dense_model_plans_ep_1_and_refuses_a_fixed_ep():
    config = load_config("configs/glm-base.yaml")
    assert plan_layout(config, nodes(1, 8, 40), HOST).layout.ep == 1
    with pytest.raises(ConfigError, match=r"ep=2 splits the routed experts, and this model has none"):
        plan_layout(config, nodes(1, 8, 40), HOST, Fixed(ep=2))


def test_a_fixed_ep_is_kept_or_refused():
    config = load_config("configs/glm-4.5.yaml")
    assert plan_layout(config, nodes(64, 8, 80), HOST, Fixed(ep=32)).layout.ep == 32
    with pytest.raises(ConfigError, match=r"ep=3 does not divide the 160 experts"):
        plan_layout(config, nodes(64, 8, 80), HOST, Fixed(ep=3))
    with pytest.raises(ConfigError, match=r"a divisor ep=32 of dp"):  # 16 devices: dp <= 16
        plan_layout(config, nodes(2, 8, 80), HOST, Fixed(ep=32))


def test_zero_3_is_planned_at_ep_1_only():
    """GLM-4.5-Air on 16 devices fits only with ZeRO-3 and the optimizer offloaded: at ep 1 (ZeRO-3 would
    partition each expert's weights over ranks that hold other experts)."""
    plan = plan_layout(load_config("configs/glm-4.5-air.yaml"), nodes(2, 8, 80), HOST)
    assert (plan.layout.zero_stage, plan.layout.ep) == (3, 1)


def test_every_parameter_is_on_one_stage():
    model = load_config("configs/glm-4.5.yaml").model
    for pp in (1, 4):
        blocks = blocks_per_stage(model.num_layers, pp)
        # at pp > 1 the last stage also holds the MTP layer's copy of the (untied) word embedding
        copy = model.padded_vocab_size(1) * model.hidden_size if pp > 1 else 0
        assert sum(stage_parameters(model, 1, pp, i, n) for i, n in enumerate(blocks)) == model.num_parameters(1) + copy
        experts = sum(stage_expert_parameters(model, 1, pp, i) for i in range(pp))
        assert experts == model.num_moe_layers() * 160 * model.expert_parameters()
    with pytest.raises(ValueError, match="holds 22 blocks"):
        stage_parameters(model, 1, 4, 0, 23)


def test_ep_halves_the_expert_weights_and_gradients_and_keeps_the_zero_1_shard():
    model = load_config("configs/glm-4.5.yaml").model
    work = Workload(model, 4096, "bf16")
    blocks = blocks_per_stage(model.num_layers, 4)
    one, two = (Layout(8, 4, 16, 1, 64, 1, 1, ep=ep) for ep in (1, 2))
    experts = stage_expert_parameters(model, 8, 4, 1)  # stage 1: 24 MoE blocks, 160 experts each split over tp 8
    assert experts == 24 * 160 * 3 * 1536 * 5120 // 8
    assert stage_expert_parameters(model, 8, 4, 1, ep=2) == experts // 2
    assert stage_parameters(model, 8, 4, 1, blocks[1]) - stage_parameters(model, 8, 4, 1, blocks[1], ep=2) == \
        experts // 2
    at_one, at_two = stage_memory(work, one, 1, blocks[1]), stage_memory(work, two, 1, blocks[1])
    assert at_one.weights - at_two.weights == 2 * experts // 2  # bf16 weights and gradients of half the experts
    assert at_one.gradients - at_two.gradients == 2 * experts // 2
    # ZeRO-1 already shards the optimizer over dp: at ep 2 a rank holds half the experts, sharded over edp = dp / 2
    assert at_one.optimizer_states == at_two.optimizer_states
    plain = [stage_memory(work, dataclasses.replace(layout, zero_stage=0), 1, blocks[1]) for layout in (one, two)]
    assert plain[0].optimizer_states - plain[1].optimizer_states == 12 * experts // 2  # without ZeRO: halved too


def test_expert_states_shard_over_edp():
    bf16 = Workload(ModelConfig(), 64, "bf16")
    # 400 non-expert parameters sharded over dp 4, 600 expert ones over edp = 4 / 2: a partition of 100 + 300
    layout = Layout(1, 1, 4, 1, 1, 0, 2, ep=2)
    states = state_bytes(bf16, layout, params=1000, persistent=0, largest=300, experts=600)
    assert states["optimizer_states"] == 16 * 400
    assert states["gradients"] == 2 * 400 + 2 * 1000  # the partition and the reduce bucket
    assert state_bytes(bf16, layout, 1000, 0, 300) == state_bytes(bf16, dataclasses.replace(layout, ep=1), 1000, 0, 300)


def test_moe_blocks_keep_no_router_among_the_persistent_parameters():
    model = load_config("configs/glm-4.5-air.yaml").model  # QKV bias 14336 / tp, two RMSNorms of 4096, no QK-norm
    blocks = blocks_per_stage(model.num_layers, 1)[0]
    mtp_norms = 3 * 4096  # enorm, hnorm and the MTP layer's final norm, beside the model's final norm
    assert persistent_parameters(model, 2, 1, 0, blocks) == 47 * (14336 // 2 + 2 * 4096) + 4096 + mtp_norms


def test_moe_activations_by_hand():
    model = load_config("configs/glm-4.5.yaml").model
    work = Workload(model, 4096, "bf16")
    tokens = 4096 * 2
    router = 4 * tokens * 160 * 2 + 8 * tokens * 8 + 4 * tokens * 8  # fp32 logits and scores, ids, weights
    routed = 2 * tokens * 8 * (2 * 5120 + 4 * 1536 // 8)  # per copy: input, output, gate/up, SiLU, product
    shared = 2 * tokens * 4 * 1536 // 8
    assert moe_activation_bytes(work, 8, 2) == router + routed + shared


@pytest.mark.parametrize("name, devices, seq_length", [
    ("glm-4.5.yaml", (64, 8), 4096), ("glm-4.5.yaml", (64, 8), 131072), ("glm-4.5-air.yaml", (2, 8), 131072)])
def test_the_plans_for_glm_4_5_pass_the_config_check(name, devices, seq_length):
    """The planner skips the layouts the config refuses (config.expert_parallel_refusal): at 131072 tokens GLM-4.5
    on 64 x 8 once got tp 4 x pp 2 x cp 4 with ep 32 under ZeRO-1, which the pipeline engine refuses."""
    config = load_config(f"configs/{name}", [f"data.seq_length={seq_length}", f"model.max_sequence_length={seq_length}"])
    plan = plan_layout(config, nodes(*devices, 80), HOST)
    with_overrides(config, plan.overrides()).validate(devices[0] * devices[1])
