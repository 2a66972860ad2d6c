"""The normalisation of every block and of the final layer: LayerNorm (GLM, GLM-130B, ChatGLM-6B) or RMSNorm
(ChatGLM2/3, GLM-4).

    layernorm:  y = (x - mean(x)) / sqrt(var(x) + eps) * g + b
    rmsnorm:    y = x / sqrt(mean(x^2) + eps) * g          (computed in fp32, cast back before the gain)
Both keep nn.LayerNorm's parameter names (weight; bias for LayerNorm only), so checkpoints name them alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.config import ModelConfig
from trainer.parallel.split import REPLICATED, SplitRule, declared


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim; the statistics in fp32."""
    x32 = x.to(torch.float32)
    normalised = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps)
    return weight * normalised.to(x.dtype)


class Norm(nn.Module):
    """config.normalization over the last dim of width hidden_size; gain 1 and bias 0 at init."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.rms = config.normalization == "rmsnorm"
        self.eps = config.layernorm_epsilon
        self.weight = nn.Parameter(torch.ones(h))
        self.register_parameter("bias", None if self.rms else nn.Parameter(torch.zeros(h)))

    def split_rules(self) -> dict[str, SplitRule]:
        """Replicated: every tensor-parallel rank normalises the whole hidden state."""
        return declared(self, {"weight": REPLICATED, "bias": REPLICATED})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return rms_norm(x, self.weight, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
