"""AdamW with GLM-130B's settings (fused where the accelerator has the kernel); no weight decay on biases and
LayerNorm parameters. With optimizer offload
(optim.offload_optimizer) the same AdamW runs on the host as DeepSpeedCPUAdam, as ZeRO-Offload expects. At
parallel.ep > 1 the routed experts' weights form groups of their own, marked as DeepSpeed's ZeRO-1/2 expects of
expert groups (deepspeed_compat.expert_param_group): ZeRO partitions their states over the expert-data group."""
from __future__ import annotations

from typing import Iterable

import torch
from deepspeed.accelerator import get_accelerator

from trainer.config import OptimConfig
from trainer.engine.deepspeed_compat import expert_param_group, full_shape
from trainer.engine.grad_norm import is_expert_parallel


def param_groups(model: torch.nn.Module, optim: OptimConfig, frozen: Iterable[torch.Tensor] = (),
                 ep: int = 1) -> list[dict]:
    """Decayed weights (2-D and more), undecayed biases and norms, and the frozen parameters of fine-tuning
    (trainer/engine/finetune.py) in a group of lr 0 without decay: AdamW moves those by exactly 0. At ep > 1 each
    such group's routed-expert weights (split over the ep ranks) follow it in a group of their own, with the same
    settings (module docstring)."""
    frozen_ids = {id(param) for param in frozen}
    decay, no_decay, fixed = [], [], []
    for param in model.parameters():
        if param.requires_grad:
            (fixed if id(param) in frozen_ids else decay if len(full_shape(param)) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": fixed, "weight_decay": 0.0, "lr": 0.0}]
    if ep > 1:
        groups = [split for group in groups for split in _experts_apart(group, ep)]
    return [group for group in groups if group["params"]]


def _experts_apart(group: dict, ep: int) -> list[dict]:
    """`group` without its routed-expert weights, then a group of those with the same settings."""
    experts = [param for param in group["params"] if is_expert_parallel(param)]
    dense = [param for param in group["params"] if not is_expert_parallel(param)]
    return [{**group, "params": dense}, expert_param_group({**group, "params": experts}, ep)]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, frozen: Iterable[torch.Tensor] = (),
                    ep: int = 1) -> torch.optim.Optimizer:
    """AdamW over param_groups (at `ep` > 1 the experts' groups apart)."""
    groups = param_groups(model, optim, frozen, ep)
    betas = (optim.beta1, optim.beta2)
    if optim.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=optim.lr, betas=betas, eps=optim.eps, adamw_mode=True)
    # The fused kernel (one launch for every tensor) where the device has one; the CPU keeps the foreach
    # AdamW, whose numbers every CPU parity test is measured against.
    fused = get_accelerator().device_name() != "cpu"
    return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, fused=fused)
