"""AdamW with GLM-130B's settings; no weight decay on biases and LayerNorm parameters."""
from __future__ import annotations

import torch

from trainer.config import OptimConfig


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps)
