"""Model FLOPs of GLM training, attention included (the count behind tflops and MFU).

Per token and layer, forward, counting a multiply-add as 2 FLOPs (h width, q = n d the query width: n query heads
of d dims, = h unless model.kv_channels says otherwise; g d the key/value width: g key/value heads, = q for
multi-head attention; f MLP width, s sequence):
    Q projection               2 * h * q
    K and V projections        2 * 2 * h * g d   (grouped-query / multi-query attention: g < n heads)
    attention output           2 * q * h
    MLP                        2 * h * f * (2 for GeLU, 3 for GeGLU and SwiGLU: their first matrix is [2f, h])
    scores Q K^T and probs V   2 * 2 * s * q   (every query head against s keys, whatever g; the full s x s
                               square: the GLM mask is not credited), or half of it under Megatron-LM's
                               current convention for causal attention (`attention="causal"`, its
                               num_floating_point_operations), the convention of published MFU figures
A mixture-of-experts block (model.is_moe_layer) replaces the MLP term by its active part, what one token computes:
    router                     2 * h * E
    routed experts             2 * 3 * h * f_e * k   (the k chosen SwiGLU experts of width f_e)
    shared experts             2 * 3 * h * f_e * n_s
so MFU is over the active parameters, as for MoE models generally (the E - k experts a token skips are not work).
Each MTP layer (model.mtp_layers, run in training) adds its eh_proj 2 * 2h * h, its block (dense or MoE, as above)
and the shared output layer again. Plus the output layer 2 * h * V_pad once per token (tied or not). Training = 3 x
forward (backward = 2 x forward). Rotary embeddings and normalisations are elementwise: not counted (O(h) per
token, against O(h^2)). Recomputed activations are not counted: these are model FLOPs (MFU), not hardware FLOPs
(HFU). For GLM-Base (L 12, h 768, s 512, V 30592, q = g d = h) that is 3 * (12 * (8 h^2 + 16 h^2 + 4 s h) + 2 h V)
per token.
"""
from __future__ import annotations

from typing import Optional

from trainer.errors import ConfigError
from trainer.model.config import ModelConfig

FLOP_FORMULA = ("train FLOPs/token = 3 * (sum over blocks of (4 h q + 4 h g d + MLP + 4 s q) + 2 h V_pad), q = query "
                "heads x head dim, g d = key/value heads x head dim (both h without grouped-query attention), MLP = "
                "2 k h f, k = 2 (GeLU) or 3 (GeGLU, SwiGLU), or in a mixture-of-experts block the active part 2 h E + "
                "6 h f_e (top-k + shared); MTP layers (training only) add 4 h^2 + a block + 2 h V_pad each; attention "
                "over the full s x s square (causal convention: 2 s q, half the square); recomputation not counted")

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
    """Forward FLOPs of one token's scores Q K^T and probs V in one layer: 4 s q over the convention's share of
    the s x s square (ATTENTION_SQUARE), q the query width."""
    return 4 * seq_length * model.qkv_rows[0] // ATTENTION_SQUARE[attention]


def block_flops_per_token(model: ModelConfig, seq_length: int, layer_index: int, attention: str = "full") -> int:
    """Forward model FLOPs of one token in block layer_index (0-based): attention and the MLP, or the active part of
    a mixture-of-experts MLP (module docstring)."""
    h = model.hidden_size
    q, kv, _ = model.qkv_rows
    scores = attention_score_flops_per_token(model, seq_length, attention)
    attention_flops = 2 * (h * q + 2 * h * kv + q * h) + scores
    if not model.is_moe_layer(layer_index):
        return attention_flops + 2 * (3 if model.gated_mlp else 2) * h * model.ffn_size
    experts = model.moe_top_k + model.moe_shared_experts
    return attention_flops + 2 * h * model.moe_num_experts + 2 * experts * model.expert_parameters()


def forward_flops_per_token(model: ModelConfig, seq_length: int, tp: int = 1, attention: str = "full") -> int:
    """Forward model FLOPs of one token (module docstring), the MTP layers included; tp only pads the vocabulary,
    attention names the attention term's convention (ATTENTION_SQUARE)."""
    h = model.hidden_size
    output_layer = 2 * h * model.padded_vocab_size(tp)
    blocks = sum(block_flops_per_token(model, seq_length, i, attention) for i in range(model.num_layers))
    mtp = sum(2 * 2 * h * h + block_flops_per_token(model, seq_length, model.num_layers + depth - 1, attention)
              + output_layer for depth in range(1, model.mtp_layers + 1))
    return blocks + output_layer + mtp


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
