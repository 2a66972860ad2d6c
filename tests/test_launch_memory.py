"""The memory model against the real model: parameter counts exactly, and the bytes of a tiny GLMModel
training step measured tensor by tensor (CPU has no allocator peak counter): weights, gradients and
AdamW states from their storages, activations as the storages autograd saves for backward
(torch.autograd.graph.saved_tensors_hooks), plus the logits the caller keeps."""
from __future__ import annotations

import pytest
import torch

from launch.memory import Layout, Workload, block_parameters, stage_memory, stage_parameters
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
    work = Workload(model, seq, "fp32", zero_stage=0, dropout_mask_bytes=4)  # CPU dropout: fp32 masks
    estimate = stage_memory(work, Layout(1, 1, 1, micro, 1, 0), 0, model.num_layers)
    assert estimate.parameters == parameters
    # fp32 without ZeRO: weights 4 + gradients 4 + Adam m, v 8 bytes per parameter, exactly.
    assert estimate.weights + estimate.gradients + estimate.optimizer_states == states
    error = (estimate.activations - activations) / activations
    print(f"activations: estimated {estimate.activations} measured {activations} error {error:+.1%}")
    assert abs(error) <= RELATIVE_ERROR
