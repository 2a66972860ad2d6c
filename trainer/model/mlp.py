"""The GLM feed-forward block on a column-parallel / row-parallel pair.

    gelu:   y = gelu(x A^T) B^T,                   A [f, h], B [h, f]
    geglu:  y = (a * gelu(g)) B^T,  [a, g] = x A^T,   A [2f, h] (GLM-130B)
    swiglu: y = (silu(g) * u) B^T,  [g, u] = x A^T,   A [2f, h] (ChatGLM2/3, GLM-4; the gate comes first, as in
            their checkpoints and transformers' gate_up_proj), silu(g) = g * sigmoid(g)
gelu is the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). For the gated MLPs A is a fused
column-parallel weight of two halves (split rule: trainer/parallel/split.py): rank r holds [A_1^(r); A_2^(r)],
its slice of both halves, and splits its own output in two with no communication. add_bias_linear=False drops
both biases.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.config import ModelConfig
from trainer.model.init import fused_normal_init, normal_init, xavier_normal_std
from trainer.parallel.layers import ColumnParallelLinear, RowParallelLinear


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GeLU, tanh approximation (the reference code's)."""
    return F.gelu(x, approximate="tanh")


def geglu(x: torch.Tensor) -> torch.Tensor:
    """[a, g] on the last dim -> a * gelu(g)."""
    a, g = x.chunk(2, dim=-1)
    return a * gelu(g)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """[g, u] on the last dim -> silu(g) * u."""
    g, u = x.chunk(2, dim=-1)
    return F.silu(g) * u


ACTIVATIONS = {"gelu": gelu, "geglu": geglu, "swiglu": swiglu}


class GLMMLP(nn.Module):
    """h -> f (or 2f for GeGLU / SwiGLU) -> h; weights named dense_h_to_4h / dense_4h_to_h as in THUDM/GLM."""

    def __init__(self, config: ModelConfig, layer_number: int, tp_group=None, seed: int = 0,
                 sequence_parallel: bool = False):
        super().__init__()
        h, f, n = config.hidden_size, config.ffn_size, config.num_layers
        self.activation = ACTIVATIONS[config.mlp]
        f_in = sum(config.ffn_in_rows)
        if config.norm == "deepnorm":  # Xavier normal with gain beta, fans of the full matrices
            std_in = xavier_normal_std(config.deepnorm_beta, h, f_in)
            std_out = xavier_normal_std(config.deepnorm_beta, f, h)
        else:
            std_in, std_out = config.init_std, config.init_std / math.sqrt(2 * n)
        name = f"layers.{layer_number - 1}.mlp"
        parts = config.ffn_in_rows if config.gated_mlp else ()
        bias = config.add_bias_linear
        self.dense_h_to_4h = ColumnParallelLinear(
            h, f_in, group=tp_group, bias=bias, parts=parts, sequence_parallel=sequence_parallel,
            init_method=fused_normal_init(seed, f"{name}.dense_h_to_4h", [std_in for _ in config.ffn_in_rows],
                                          config.ffn_in_rows))
        self.dense_4h_to_h = RowParallelLinear(f, h, group=tp_group, bias=bias, sequence_parallel=sequence_parallel,
                                               init_method=normal_init(seed, f"{name}.dense_4h_to_h", std_out))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, h] (replicated over the tp group) -> [b, s, h]; sequence-parallel: this rank's tokens
        [b, s/tp, h] -> [b, s/tp, h] (gathered before dense_h_to_4h, reduce-scattered after dense_4h_to_h)."""
        intermediate = self.dense_h_to_4h(hidden)  # [b, s, f_in / tp]
        return self.dense_4h_to_h(self.activation(intermediate))
