"""Model FLOPs of GLM training, attention included (the count behind tflops and MFU).

Per token and layer, forward, counting a multiply-add as 2 FLOPs (h width, f MLP width, s sequence, g d the
key/value width: g key/value heads of d dims, = h for multi-head attention):
    Q projection               2 * h^2
    K and V projections        2 * 2 * h * g d   (grouped-query / multi-query attention: g < n heads)
    attention output           2 * h^2
    MLP                        2 * h * f * (2 for GeLU, 3 for GeGLU and SwiGLU: their first matrix is [2f, h])
    scores Q K^T and probs V   2 * 2 * s * h   (every query head against s keys, whatever g; the full s x s
                               square: the GLM mask is not credited), or half of it under Megatron-LM's
                               current convention for causal attention (`attention="causal"`, its
                               num_floating_point_operations), the convention of published MFU figures
plus the output layer 2 * h * V_pad once per token (tied or not). Training = 3 x forward (backward = 2 x
forward). Rotary embeddings and normalisations are elementwise: not counted (O(h) per token, against O(h^2)).
Recomputed activations are not counted: these are model FLOPs (MFU), not hardware FLOPs (HFU).
For GLM-Base (L 12, h 768, s 512, V 30592, g d = h) that is 3 * (12 * (8 h^2 + 16 h^2 + 4 s h) + 2 h V) per token.
"""
from __future__ import annotations

from typing import Optional

from trainer.errors import ConfigError
from trainer.model.config import ModelConfig

FLOP_FORMULA = ("train FLOPs/token = 3 * (L * (4 h^2 + 4 h g d + 2 k h f + 4 s h) + 2 h V_pad), g d = key/value "
                "heads x head dim (h without grouped-query attention), k = 2 (GeLU) or 3 (GeGLU, SwiGLU); attention "
                "over the full s x s square (causal convention: 2 s h, half the square); recomputation not counted")

ATTENTION_SQUARE = {"full": 1, "causal": 2}
"""The attention term's convention -> the divisor of the full s x s square: "full" (this trainer's count since
glm-bench began) or "causal" (Megatron-LM's current count, half the square for a causal mask)."""

PEAK_TFLOPS = {
    # Dense (no sparsity) tensor-core peaks from the vendors' data sheets, per device.
    ("h100-sxm", "bf16"): 989.4, ("h100-sxm", "fp32"): 66.9,
    ("h100-pcie", "bf16"): 756.5, ("h100-pcie", "fp32"): 51.2,
    ("h200", "bf16"): 989.4, ("h200", "fp32"): 66.9,
    ("a100", "bf16"): 312.0, ("a100", "fp32"): 19.5,
}
"""Known peak TFLOP/s by (device, precision); fp32 is the non-tensor-core (no TF32) rate."""


def attention_score_flops_per_token(model: ModelConfig, seq_length: int, attention: str = "full") -> int:
    """Forward FLOPs of one token's scores Q K^T and probs V in one layer: 4 s h over the convention's share of
    the s x s square (ATTENTION_SQUARE)."""
    return 4 * seq_length * model.hidden_size // ATTENTION_SQUARE[attention]


def forward_flops_per_token(model: ModelConfig, seq_length: int, tp: int = 1, attention: str = "full") -> int:
    """Forward model FLOPs of one token (module docstring); tp only pads the vocabulary, attention names the
    attention term's convention (ATTENTION_SQUARE)."""
    h, f = model.hidden_size, model.ffn_size
    kv_width = model.num_kv_heads * model.head_dim
    mlp_matrices = 3 if model.gated_mlp else 2
    projections = 2 * (h * h + 2 * h * kv_width + h * h)
    per_layer = projections + attention_score_flops_per_token(model, seq_length, attention) + 2 * mlp_matrices * h * f
    return model.num_layers * per_layer + 2 * h * model.padded_vocab_size(tp)


def train_flops_per_token(model: ModelConfig, seq_length: int, tp: int = 1, attention: str = "full") -> int:
    """Training model FLOPs of one token: 3 x forward (FLOP_FORMULA)."""
    return 3 * forward_flops_per_token(model, seq_length, tp, attention)


def peak_tflops(peak: Optional[str], precision: str) -> Optional[float]:
    """A number (TFLOP/s) or a known device name (PEAK_TFLOPS) -> TFLOP/s; None when not given."""
    if peak is None:
        return None
    try:
        return float(peak)
    except ValueError:
        pass
    key = (peak.lower(), precision)
    if key not in PEAK_TFLOPS:
        names = sorted({name for name, _ in PEAK_TFLOPS})
        raise ConfigError(f"no known {precision} peak for {peak!r}: give the peak in TFLOP/s or one of "
                          f"{', '.join(names)}")
    return PEAK_TFLOPS[key]
