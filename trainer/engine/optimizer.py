"""AdamW with GLM-130B's settings (fused where the accelerator has the kernel); no weight decay on biases and
LayerNorm parameters. With optimizer offload
(optim.offload_optimizer) the same AdamW runs on the host as DeepSpeedCPUAdam, as ZeRO-Offload expects."""
from __future__ import annotations

from typing import Iterable

import torch
from deepspeed.accelerator import get_accelerator

from trainer.config import OptimConfig
from trainer.engine.deepspeed_compat import full_shape


def param_groups(model: torch.nn.Module, optim: OptimConfig, frozen: Iterable[torch.Tensor] = ()) -> list[dict]:
    """Decayed weights (2-D and more), undecayed biases and norms, and the frozen parameters of fine-tuning
    (trainer/engine/finetune.py) in a group of lr 0 without decay: AdamW moves those by exactly 0."""
    frozen_ids = {id(param) for param in frozen}
    decay, no_decay, fixed = [], [], []
    for param in model.parameters():
        if param.requires_grad:
            (fixed if id(param) in frozen_ids else decay if len(full_shape(param)) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": fixed, "weight_decay": 0.0, "lr": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig,
                    frozen: Iterable[torch.Tensor] = ()) -> torch.optim.Optimizer:
    groups = param_groups(model, optim, frozen)
    betas = (optim.beta1, optim.beta2)
    if optim.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=optim.lr, betas=betas, eps=optim.eps, adamw_mode=True)
    # The fused kernel (one launch for every tensor) where the device has one; the CPU keeps the foreach
    # AdamW, whose numbers every CPU parity test is measured against.
    fused = get_accelerator().device_name() != "cpu"
    return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, fused=fused)
