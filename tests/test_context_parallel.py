"""Context parallelism (trainer/parallel/context.py): the load-balanced split of a row, one rank's rows of the GLM
mask and of attention against the unsplit model, and glm-train at cp = 2 against one process (losses within 1e-5,
gradient norms within 1e-6 at every step), including a resume at another cp, and glm-4.5-debug at cp = 2 x ep = 2
and with its MTP layer at cp = 2."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from tests.distributed import run_distributed
from tests.test_engine_parity import _grad_norms, _losses
from tests.test_model_mask import packed_segments
from trainer.config import load_config
from trainer.errors import ConfigError
from trainer.model.attention import flex_glm_attention
from trainer.model.config import ModelConfig
from trainer.model.glm import GLMLoss, GLMModel
from trainer.model.mask import GLMMask
from trainer.parallel.context import chunk_positions, gather_row, row_order, split_row
from trainer.parallel.topology import Topology


# ---- the split ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_the_ranks_chunks_partition_the_row_head_and_tail_paired(cp):
    s = 24
    chunks = [chunk_positions(s, cp, rank) for rank in range(cp)]
    c = s // (2 * cp)
    assert chunks[0].tolist() == list(range(c)) + list(range(s - c, s))  # the first chunk with the last
    assert torch.equal(torch.sort(torch.cat(chunks)).values, torch.arange(s))
    assert torch.equal(torch.cat(chunks)[row_order(s, cp)], torch.arange(s))
    assert chunks[-1].tolist() == list(range((cp - 1) * c, (cp + 1) * c))  # the middle two chunks, contiguous


def test_a_row_that_does_not_split_into_2cp_chunks_is_refused():
    with pytest.raises(ValueError, match="does not split into 2 \\* cp = 4 equal chunks"):
        chunk_positions(10, 2, 0)
    config = load_config("configs/glm-debug.yaml", ["parallel.cp=2", "data.seq_length=126"])
    with pytest.raises(ConfigError, match="data.seq_length=126 is not a multiple of 2 \\* parallel.cp = 4"):
        config.validate(world_size=2)
    config = load_config("configs/glm-debug.yaml", ["parallel.cp=2", "train.eval_tasks=[lambada]",
                                                    "train.eval_interval=2"])
    with pytest.raises(ConfigError, match="train.eval_tasks with parallel.cp=2"):
        config.validate(world_size=2)
    load_config("configs/glm-debug.yaml", ["parallel.cp=2", "parallel.pp=2"]).validate(world_size=4)


# ---- one rank's rows of the mask and of attention -------------------------------------------------------

# Packed rows of (length, sep) samples: seps inside chunks and on chunk boundaries (cp = 2, 3, 4 cut 24 slots
# into chunks of 6, 4, 3), samples across chunk boundaries, a causal sample (sep 1), a padding tail.
ROWS = [[(5, 3), (4, 2), (6, 6), (3, 1)], [(7, 1), (3, 2), (12, 4)], [(24, 12)], [(2, 1)] * 9 + [(1, 1)]]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_a_chunk_mask_is_the_ranks_rows_of_the_full_mask(cp):
    s = 24
    segments = packed_segments(ROWS, s)
    full = GLMMask(segments).dense()  # [b, 1, s, s]
    for rank in range(cp):
        positions = chunk_positions(s, cp, rank)
        chunk = GLMMask(segments[:, :, positions]).chunk(cp, rank)
        assert torch.equal(chunk.dense(), full[:, :, positions])
        assert torch.equal(chunk.additive(torch.float32) == 0, full[:, :, positions])


def test_a_chunk_block_mask_computes_the_ranks_rows_and_skips_the_same_tiles():
    """FlexAttention (eager on CPU: forward only) on one rank's 2 x 128 query rows against the 512 keys equals
    those rows of the full attention; its tiles are the full block mask's tiles of those query tiles."""
    torch.manual_seed(0)
    s, n, d, cp = 512, 2, 16, 2
    rows = [[(100, 40), (200, 130), (60, 60)], [(130, 129), (128, 3)], [(512, 300)]]
    segments = packed_segments(rows, s)
    q, k, v = (torch.randn(len(rows), n, s, d) for _ in range(3))
    full = GLMMask(segments)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=full.dense())
    full_tiles = full.block_mask().to_dense()  # [b, 1, 4, 4]
    for rank in range(cp):
        positions = chunk_positions(s, cp, rank)
        chunk = GLMMask(segments[:, :, positions]).chunk(cp, rank)
        assert_close(flex_glm_attention(q[:, :, positions], k, v, chunk.block_mask()), expected[:, :, positions],
                     atol=1e-5, rtol=1e-5)
        tiles = positions[::128] // 128  # the query tiles of the rank's two chunks
        assert torch.equal(chunk.block_mask().to_dense(), full_tiles[:, :, tiles])


SWITCH_SETS = {
    "glm_learned_2d": dict(position_embedding="learned_2d", norm="pre_ln", mlp="gelu"),
    "glm130b_rope1d_fp32_softmax": dict(position_embedding="rope_1d", norm="deepnorm", mlp="geglu",
                                        embedding_shrink_alpha=0.1, fp32_softmax_layer_scaling=True),
    "chatglm_rope2d": dict(position_embedding="rope_2d", norm="deepnorm", mlp="geglu"),
    "glm4_partial_rope_gqa": dict(position_embedding="rope_1d", rotary_fraction=0.5, rotary_pairing="interleaved",
                                  normalization="rmsnorm", mlp="swiglu", num_key_value_heads=2,
                                  add_bias_linear=False, tie_word_embeddings=False),
}


def packed_batch(rows: list[list[tuple[int, int]]], s: int, vocab: int = 100):
    """GLM-shaped packed rows: in each sample Part A at positions 0.., Part B at the position of a blank in Part A
    with block positions 1, 2, ...; the loss on Part B. -> (inputs, (labels, loss_mask))."""
    generator = torch.Generator().manual_seed(0)
    b = len(rows)
    input_ids = torch.randint(0, vocab, (b, s), generator=generator)
    labels = torch.randint(0, vocab, (b, s), generator=generator)
    position_ids, block_position_ids, loss_mask = (torch.zeros(b, s, dtype=torch.long) for _ in range(3))
    for i, row in enumerate(rows):
        start = 0
        for length, sep in row:
            for t in range(length):
                part_b = t >= sep
                position_ids[i, start + t] = min(sep - 1, 1) if part_b else t
                block_position_ids[i, start + t] = t - sep + 1 if part_b else 0
                loss_mask[i, start + t] = int(part_b)
            start += length
    segments = packed_segments(rows, s)
    return (input_ids, position_ids, block_position_ids, segments), (labels, loss_mask)


def _chunk_rows_match_the_full_model(rank, world_size, switches):
    torch.manual_seed(0)
    topology = Topology.create(tp=1, pp=1, cp=world_size)
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100,
                         max_sequence_length=24, hidden_dropout=0.0, attention_dropout=0.0, **switches)
    s = 24
    inputs, (labels, loss_mask) = packed_batch(ROWS, s)
    reference, model = GLMModel(config, seed=3), GLMModel(config, seed=3, cp_group=topology.cp_group)
    loss_fn = GLMLoss(config)
    tokens = loss_mask.sum().float()
    expected_logits = reference(*inputs)
    loss_fn(expected_logits, (labels, loss_mask, tokens)).backward()

    local = [split_row(t, topology.cp_group) for t in inputs]  # this rank's chunks: [b, s / cp], [b, 2, s / cp]
    logits = model(*local)
    positions = chunk_positions(s, world_size, rank)
    assert_close(logits, expected_logits[:, positions], atol=1e-5, rtol=1e-5)
    # The row's loss is the sum of the ranks' chunk losses over the row's loss tokens: the gradient summed over
    # the cp ranks is the full model's.
    target = (split_row(labels, topology.cp_group), split_row(loss_mask, topology.cp_group), tokens)
    loss_fn(logits, target).backward()
    for (name, param), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        grad = param.grad.clone()
        dist.all_reduce(grad, group=topology.cp_group)
        assert_close(grad, expected.grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("switches", list(SWITCH_SETS.values()), ids=list(SWITCH_SETS))
def test_one_ranks_chunks_give_the_rows_and_gradients_of_the_full_model(switches):
    run_distributed(_chunk_rows_match_the_full_model, 2, switches)


def _gather_row_gradient(rank, world_size):
    topology = Topology.create(tp=1, pp=1, cp=world_size)
    s = 8
    full = torch.arange(2 * s, dtype=torch.float32).view(2, s)  # [b, s]
    local = split_row(full, topology.cp_group).requires_grad_()
    gathered = gather_row(local, topology.cp_group, dim=1)
    assert torch.equal(gathered, full)  # row order restored
    weights = torch.arange(s, dtype=torch.float32) * (rank + 1)  # each rank reads the whole row differently
    (gathered * weights).sum().backward()
    summed = torch.arange(s, dtype=torch.float32) * sum(r + 1 for r in range(world_size))
    assert torch.equal(local.grad, split_row(summed, topology.cp_group).expand(2, -1))  # reduce-scattered


def test_gather_row_restores_the_row_and_reduce_scatters_the_gradient():
    run_distributed(_gather_row_gradient, 2)


# ---- glm-train at cp = 2 against one process -----------------------------------------------------------

STEPS = 4
SHORT = [f"train.steps={STEPS}", "optim.decay_steps=2", "train.eval_interval=4"]
"""4 steps of 8 packed rows of 128 tokens, validated at step 4: cp = 2 cuts each row into 4 chunks of 32."""


def _compare(tmp_path, name, overrides, world_size, config_path="configs/glm-debug.yaml", layout=()):
    """One process against cp = 2 (with `layout`'s other axes) on world_size processes."""
    reference = _losses(tmp_path, f"{name}_single", SHORT + overrides, config_path=config_path)
    losses = _losses(tmp_path, name, SHORT + overrides + ["parallel.cp=2", *layout], world_size=world_size,
                     config_path=config_path)
    assert len(losses) == STEPS + 1  # the training losses, then the validation loss
    assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)
    assert_close(torch.tensor(_grad_norms(tmp_path, name), dtype=torch.float64),
                 torch.tensor(_grad_norms(tmp_path, f"{name}_single"), dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["mask", "smask", "gmask"])
def test_glm_debug_packed_at_cp2_matches_one_process_in_every_blank_mode(tmp_path, mode):
    _compare(tmp_path, f"cp2_{mode}", [f"data.modes={{{mode}: 1.0}}"], world_size=2)


def test_cp2_under_zero2_matches_one_process(tmp_path):
    """ZeRO-2 partitions gradients and optimizer states over DeepSpeed's data-parallel ranks, the two cp ranks."""
    _compare(tmp_path, "cp2_zero2", [], world_size=2, layout=["optim.zero_stage=2"])


def test_glm4_debug_causal_at_cp2_matches_one_process(tmp_path):
    _compare(tmp_path, "glm4_cp2", [], world_size=2, config_path="configs/glm-4-debug.yaml")


@pytest.mark.parametrize("name, layout", [
    ("pp2_cp2", ["parallel.pp=2"]),  # DeepSpeed's pipeline engine, its data axis dp x cp
    ("tp2_cp2", ["parallel.tp=2"]),
    ("tp2_sp_cp2", ["parallel.tp=2", "parallel.sequence_parallel=true"]),  # each rank s / (cp tp) tokens outside
])
def test_four_process_layouts_with_cp2_match_one_process(tmp_path, name, layout):
    _compare(tmp_path, name, [], world_size=4, layout=layout)


@pytest.mark.parametrize("first_cp, then_cp", [(2, 1), (1, 2)])
def test_a_resume_at_another_cp_continues_the_curve(tmp_path, first_cp, then_cp):
    """2 steps at one cp, saved, then steps 3 and 4 at the other: the losses of the uninterrupted run."""
    whole = _losses(tmp_path, "whole", SHORT)
    # one run directory ("run"): the second start resumes the first's last checkpoint
    first = _losses(tmp_path, "run", SHORT + ["train.steps=2", f"parallel.cp={first_cp}"], world_size=first_cp)
    then = _losses(tmp_path, "run", SHORT + ["train.resume=true", f"parallel.cp={then_cp}"], world_size=then_cp)
    assert_close(torch.tensor(first[:2]), torch.tensor(whole[:2]), rtol=1e-5, atol=0)
    assert_close(torch.tensor(then[:2]), torch.tensor(whole[2:STEPS]), rtol=1e-5, atol=0)


# ---- the planner and the memory model -------------------------------------------------------------------

GB = 10 ** 9
LONG_ROWS = ["data.seq_length=131072", "model.max_sequence_length=131072"]


def _cluster(nodes: int, per_node: int):
    from launch.devices import Cluster

    return Cluster(tuple((f"node{i}", per_node) for i in range(nodes)), 80 * GB, "cuda", "hostfile")


def test_the_memory_model_divides_a_rows_activations_over_cp_but_keeps_the_whole_rows_keys_and_values():
    from launch.memory import Layout, Workload, block_activation_bytes, stage_memory

    work = Workload.from_config(load_config("configs/glm-4-9b.yaml", LONG_ROWS))
    one, two = (block_activation_bytes(work, tp=2, micro_batch=1, cp=cp) for cp in (1, 2))
    assert one / 2 < two < 0.6 * one  # halved but for the gathered K/V and the mask rows
    layouts = [Layout(2, 1, 4 // cp, 1, 16, 1, 1, cp=cp) for cp in (1, 2)]  # 8 GPUs, ZeRO-1 over dp x cp = 4
    states = [stage_memory(work, layout, 0, 40).optimizer_states for layout in layouts]
    assert states[0] == states[1]


def test_the_planner_splits_a_long_row_over_cp_ranks_only_when_it_fits_no_other_way():
    from launch.devices import HostMemory
    from launch.planner import Fixed, plan_layout

    host = HostMemory(1000 * GB, "--host-memory")
    config = load_config("configs/glm-4-9b.yaml", LONG_ROWS)
    plan = plan_layout(config, _cluster(1, 8), host)
    assert (plan.layout.tp, plan.layout.pp, plan.layout.cp, plan.layout.dp) == (2, 1, 4, 1)
    assert plan.layout.offload_optimizer == "none" and "parallel.cp=4" in plan.overrides()
    assert [rank["cp_rank"] for rank in plan.ranks()] == [0, 0, 1, 1, 2, 2, 3, 3]  # tp adjacent, then cp
    two_nodes = plan_layout(config, _cluster(2, 8), host).layout  # sequence parallelism (on with tp) saves a stage
    assert (two_nodes.tp, two_nodes.pp, two_nodes.cp, two_nodes.sequence_parallel) == (2, 2, 2, True)
    without_sp = plan_layout(config, _cluster(2, 8), host, Fixed(sequence_parallel=False)).layout
    assert (without_sp.tp, without_sp.pp, without_sp.cp) == (2, 4, 2)
    with pytest.raises(ConfigError, match="does not fit on any number of devices"):
        plan_layout(config, _cluster(1, 8), host, Fixed(cp=1))
    short = plan_layout(load_config("configs/glm-4-9b.yaml"), _cluster(1, 8), host)  # 8192 tokens fit at cp 1
    assert short.layout.cp == 1


def test_moe_at_cp2_with_ep2_matches_one_process(tmp_path):
    """glm-4.5-debug at dp = 1, cp = 2, ep = 2 on two processes (the ep group is the two cp ranks: each holds 4 of
    the 8 experts of every MoE layer), without the MTP layer (BASE pins it off; with it: the next test) and the
    balance loss (refused at cp > 1): each
    rank routes its own chunks' tokens and the all-to-all takes them to their experts' rank. The losses and gradient
    norms are the single process's, the z-loss and the load imbalance too (each chunk's z-loss is the mean over as
    many tokens, and the loads are summed over dp x cp: the metrics are computed whatever the coefficients), and so
    are the expert biases after the last step's update.
    The z-loss's gradient is off here: on, it differs from one process's by rounding (each rank's mean over its
    chunks' tokens), which Adam's first step turns into weight differences of up to 4e-5 in elements whose
    gradient is ~1e-10, and step 2's gradient norm was 1.15e-6 off (losses within 1.2e-7); cp = 2 with ep = 1 is
    the same, so the cause is the split of the z-loss, not expert parallelism."""
    from tests.test_sequence_parallel import _column, _moe_run

    no_router_losses = ["model.moe_aux_loss_coeff=0", "model.moe_z_loss_coeff=0"]
    single = _moe_run(tmp_path, "single", no_router_losses)
    cp_ep = _moe_run(tmp_path, "cp2_ep2", no_router_losses + ["parallel.cp=2", "parallel.ep=2"], world_size=2)
    assert_close(torch.tensor(cp_ep["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    assert_close(_column(cp_ep, "grad_norm"), _column(single, "grad_norm"), rtol=1e-6, atol=0)
    for key in ("moe_z_loss", "moe_load_imbalance"):
        assert_close(_column(cp_ep, key), _column(single, key), rtol=1e-6, atol=0)
    assert cp_ep["biases"] == single["biases"] and any(any(bias) for bias in single["biases"].values())


@pytest.mark.parametrize("name,layout,world_size", [("cp2", ["parallel.cp=2"], 2),
                                                     ("pp2_cp2", ["parallel.pp=2", "parallel.cp=2"], 4)])
def test_the_mtp_layer_at_cp2_matches_one_process(tmp_path, name, layout, world_size):
    """glm-4.5-debug with its MTP layer (its block MoE too) at cp = 2 on two processes, and at pp = 2 x cp = 2 on
    four (the next-token ids ride the stages at s / cp): the next-token ids and the MTP labels and loss mask are
    shifted on the whole packed rows before the split (trainer/engine/loop.py pipeline_format), so each chunk's
    last slot keeps its true t+1 and t+2, the MTP block attends over the whole row by the same all-gather of K/V
    as the main blocks, and its loss is normalised as the main one (N_step / (GAS * dp * cp)): losses, mtp_loss
    and gradient norms are the single process's at every step. The router losses are off as in
    test_moe_at_cp2_with_ep2_matches_one_process (the balance loss is refused at cp > 1; the z-loss's split over
    the chunks differs by rounding)."""
    from tests.test_sequence_parallel import _column, _moe_run

    overrides = ["model.mtp_layers=1", "model.moe_aux_loss_coeff=0", "model.moe_z_loss_coeff=0"]
    single = _moe_run(tmp_path, "single", overrides)
    run = _moe_run(tmp_path, name, overrides + layout, world_size=world_size)
    assert_close(torch.tensor(run["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    assert_close(_column(run, "mtp_loss"), _column(single, "mtp_loss"), rtol=1e-5, atol=0)
    assert_close(_column(run, "grad_norm"), _column(single, "grad_norm"), rtol=1e-6, atol=0)
    assert all(record["mtp_loss"] > 0 for record in single["records"])
