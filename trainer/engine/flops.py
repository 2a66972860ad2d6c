"""Model FLOPs of GLM training, attention included (the count behind tflops and MFU).

Per token and layer, forward, counting a multiply-add as 2 FLOPs:
  QKV projections 2 * 3h^2, attention output 2 * h^2, MLP 2 * h * f * (2 for GeLU, 3 for GeGLU),
  attention scores Q K^T and probabilities x V: 2 * 2 * s * h (the full s x s square; the GLM mask
  is not exploited, as in Megatron's formula).
Plus the output layer 2 * h * V. Training = 3 x forward (backward = 2 x forward). Activation
recomputation is not counted: these are model FLOPs (MFU), not hardware FLOPs.
"""
from __future__ import annotations

from trainer.model.config import ModelConfig


def forward_flops_per_token(model: ModelConfig, seq_length: int, tp: int = 1) -> int:
    h, f = model.hidden_size, model.ffn_size
    mlp_matrices = 3 if model.mlp == "geglu" else 2
    per_layer = 2 * 4 * h * h + 2 * mlp_matrices * h * f + 4 * seq_length * h
    return model.num_layers * per_layer + 2 * h * model.padded_vocab_size(tp)


def train_flops_per_token(model: ModelConfig, seq_length: int, tp: int = 1) -> int:
    return 3 * forward_flops_per_token(model, seq_length, tp)
