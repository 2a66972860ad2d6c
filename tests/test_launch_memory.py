"""The memory model against the real model: parameter counts exactly, and the bytes of a tiny GLMModel
training step measured tensor by tensor (CPU has no allocator peak counter): weights, gradients and
AdamW states from their storages, activations as the storages autograd saves for backward
(torch.autograd.graph.saved_tensors_hooks), plus the logits the caller keeps."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from launch.memory import (CPU_RUNTIME_RESERVE, Layout, Workload, ZeroBuckets, block_parameters, persistent_parameters,
                           stage_memory, stage_parameters, state_bytes)
from trainer.model.config import ModelConfig

RELATIVE_ERROR = 0.05
"""Allowed |estimate - measured| / measured of the activations (docs/LAUNCH.md states the errors)."""

GLM_SMALL = dict(num_layers=3, hidden_size=64, num_attention_heads=4, vocab_size=1000, max_sequence_length=64,
                 hidden_dropout=0.1, attention_dropout=0.0)
GLM_130B_SHAPED = dict(GLM_SMALL, mlp="geglu", norm="deepnorm", position_embedding="rope_1d",
                       fp32_softmax_layer_scaling=True, embedding_shrink_alpha=0.1)


def test_parameter_count_matches_the_closed_form():
    for fields in (GLM_SMALL, GLM_130B_SHAPED):
        model = ModelConfig(**fields)
        assert stage_parameters(model, 1, 1, 0, model.num_layers) == model.num_parameters(1)
    big = ModelConfig(num_layers=70, hidden_size=12288, num_attention_heads=96, vocab_size=150528, mlp="geglu",
                      ffn_hidden_size=32768, position_embedding="rope_1d")
    # pp = 8, tp = 4: the stages hold every block once and the word embedding twice (tied copies).
    blocks = [8, 9, 9, 9, 9, 9, 9, 8]
    per_rank = sum(stage_parameters(big, 4, 8, i, n) for i, n in enumerate(blocks))
    word = big.padded_vocab_size(4) * big.hidden_size
    replicated_per_block = 6 * big.hidden_size
    expected = (big.num_parameters(1) + word - 70 * replicated_per_block - 2 * big.hidden_size) / 4 \
        + 70 * replicated_per_block + 2 * big.hidden_size
    assert per_rank == pytest.approx(expected, abs=8)
    assert block_parameters(big, 1) * 70 + word + 2 * big.hidden_size == big.num_parameters(1)


def _measure(fields: dict, seq: int, micro_batch: int) -> tuple[int, int, int, "torch.nn.Module"]:
    """(weights + grads + AdamW state bytes, activation bytes, parameter count) of one training step."""
    from trainer.model.glm import GLMLoss, GLMModel

    torch.manual_seed(0)
    config = ModelConfig(**fields)
    model = GLMModel(config, tp_group=None, seed=0).train()
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq))
    positions = torch.arange(seq).expand(micro_batch, seq)
    from trainer.model.mask import segments_of_sep

    segments = segments_of_sep(torch.full((micro_batch,), seq // 2), seq)
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(ids, positions, torch.zeros_like(positions), segments)
        loss = GLMLoss(config)(logits, (ids, torch.ones_like(ids)))
    saved[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    activations = sum(saved.values())
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    states = sum(t.numel() * t.element_size() for t in tensors)
    return states, activations, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("fields", [GLM_SMALL, GLM_130B_SHAPED], ids=["glm", "glm-130b-shaped"])
def test_estimate_matches_a_measured_training_step(fields):
    torch.set_num_threads(1)
    seq, micro = 64, 2
    states, activations, parameters = _measure(fields, seq, micro)
    model = ModelConfig(**fields)
    work = Workload(model, seq, "fp32", dropout_mask_bytes=4)  # CPU dropout: fp32 masks
    estimate = stage_memory(work, Layout(1, 1, 1, micro, 1, 0, zero_stage=0), 0, model.num_layers)
    assert estimate.parameters == parameters
    # fp32 without ZeRO: weights 4 + gradients 4 + Adam m, v 8 bytes per parameter, exactly.
    assert estimate.weights + estimate.gradients + estimate.optimizer_states == states
    error = (estimate.activations - activations) / activations
    print(f"activations: estimated {estimate.activations} measured {activations} error {error:+.1%}")
    assert abs(error) <= RELATIVE_ERROR


BF16 = Workload(ModelConfig(**GLM_SMALL), 64, "bf16")
"""Per-stage byte counts by hand: 1000 parameters, 100 of them 1-D, the largest weight 300, dp 4, bf16,
DeepSpeed's default buckets (reduce 5e8, prefetch 5e7: larger than the model, so all of it)."""


@pytest.mark.parametrize("zero, expected", [
    # ZeRO-1: bf16 weights 2 B and gradients 2 B each; master + m + v 12 B over dp 4
    ((1, "none", "none"), dict(weights=2000, gradients=2000, optimizer_states=3000, working_set=0, host_states=0)),
    # ZeRO-2: gradient partition 2 * 1000 / 4 + the reduce bucket 2 * 1000; optimizer 16 * 1000 / 4
    ((2, "none", "none"), dict(weights=2000, gradients=2500, optimizer_states=4000, working_set=0, host_states=0)),
    # ZeRO-3: 2 * 900 / 4 + 2 * 100 whole; gradients 500 + twice the bucket; the whole model gathered
    ((3, "none", "none"), dict(weights=650, gradients=4500, optimizer_states=4000, working_set=2000, host_states=0)),
    # ZeRO-3, optimizer on the host: (16 + 2) * 1000 / 4; the device keeps the two buckets
    ((3, "cpu", "none"), dict(weights=650, gradients=4000, optimizer_states=0, working_set=2000, host_states=4500)),
    # ... and the weights: + 2 * 900 / 4 on the host, the 1-D ones stay whole on the device
    ((3, "cpu", "cpu"), dict(weights=200, gradients=4000, optimizer_states=0, working_set=2000, host_states=4950)),
    # ZeRO-2, optimizer on the host with accumulation: (16 + 2) * 250 + the half-precision accumulator 2 * 250
    ((2, "cpu", "none"), dict(weights=2000, gradients=2000, optimizer_states=0, working_set=0, host_states=5000)),
])
def test_state_bytes_per_zero_stage_and_offload(zero, expected):
    layout = Layout(1, 1, 4, 1, 2, 0, *zero)
    assert state_bytes(BF16, layout, params=1000, persistent=100, largest=300) == expected


def test_zero_3_working_set_is_the_largest_weight_plus_the_prefetch_bucket():
    big = dataclasses.replace(BF16, buckets=ZeroBuckets(stage3_prefetch_bucket_size=50))
    states = state_bytes(big, Layout(1, 1, 4, 1, 1, 0, 3), params=1000, persistent=100, largest=300)
    assert states["working_set"] == 2 * (300 + 50)


def test_zero_1_in_fp32_at_dp_1_runs_stage_0():
    fp32 = dataclasses.replace(BF16, precision="fp32")
    states = state_bytes(fp32, Layout(1, 1, 1, 1, 1, 0, 1), params=1000, persistent=100, largest=300)
    assert (states["weights"], states["gradients"], states["optimizer_states"]) == (4000, 4000, 8000)


def test_persistent_parameters_are_the_biases_and_norms():
    model = ModelConfig(**GLM_SMALL)  # h 64: qkv bias 192, ffn bias 256, dense and ffn-out biases 2 * 64, 2 LayerNorms
    assert persistent_parameters(model, 1, 1, 0, 3) == 3 * (192 + 256 + 128 + 256) + 128


def test_a_cpu_rank_counts_the_measured_process_as_its_reserve():
    model = ModelConfig(**GLM_SMALL)
    cpu = stage_memory(Workload(model, 64, "fp32", 4, on_cpu=True), Layout(1, 1, 2, 2, 1, 0, 2), 0, 3)
    gpu = stage_memory(Workload(model, 64, "fp32", 4), Layout(1, 1, 2, 2, 1, 0, 2), 0, 3)
    assert cpu.reserve == CPU_RUNTIME_RESERVE and gpu.reserve == 1 << 30
    assert cpu.total - cpu.reserve == gpu.total - gpu.reserve


# Two shapes: A, where the ZeRO states dominate (84M parameters, short sequences), and B, where the
# activations do (17M parameters, sequence 512); docs/LAUNCH.md has all four (shape, stage) pairs.
SHAPE_A = ["model.num_layers=6", "model.hidden_size=1024", "model.num_attention_heads=8",
           "model.vocab_size=8192", "data.seq_length=128", "model.max_sequence_length=128",
           "parallel.micro_batch_size=2", "parallel.global_batch_size=4"]
SHAPE_B = ["model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
           "model.vocab_size=8192", "data.seq_length=512", "model.max_sequence_length=512",
           "parallel.micro_batch_size=4", "parallel.global_batch_size=8"]


@pytest.mark.parametrize("shape, stage", [(SHAPE_A, 2), (SHAPE_B, 3)], ids=["A_zero2", "B_zero3"])
def test_estimate_is_within_15_percent_of_the_measured_peak_resident_memory(shape, stage):
    """Two gloo ranks of DeepSpeed's plain engine in fp32, 2 optimizer steps each (25-40 s on 2 cores), against
    launch/memory.py's estimate of a CPU rank."""
    from launch.memory_check import estimate, measure
    from trainer.config import load_config

    config = load_config("configs/glm-debug.yaml", shape + [f"optim.zero_stage={stage}"])
    peak = max(row["peak"] for row in measure(config, 2, 2))
    predicted = estimate(config, 2)["total"]
    print(f"ZeRO-{stage}: estimated {predicted} measured {peak} error {(predicted - peak) / peak:+.1%}")
    assert abs(predicted - peak) <= 0.15 * peak
