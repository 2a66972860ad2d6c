"""The data-parallel gradient reduction at parallel.ep > 1 (without ZeRO), which replaces DeepSpeed's own.

DeepSpeed averages every gradient over its data-parallel group, our dp x cp. Under expert parallelism the
routed experts' weights (parameters marked `expert_parallel`) differ between the ranks of an ep group: rank r
holds the r-th E/ep block of experts, and only the ranks of its expert-data group (edp, mesh.py) hold the same
block. So:
    dense weights   g <- (1 / (dp cp)) sum over dp x cp of g
    expert weights  g <- (1 / (dp cp)) sum over edp of g
The expert divisor is dp cp too, not edp: every rank's loss is scaled so that the mean over dp x cp is the
step's loss (engine/step_loss.py), and an expert's local gradient already holds the contributions of the
tokens every rank of its ep group sent it (the all-to-all's backward, parallel/expert_dispatch.py). DeepSpeed's
own MoE reduction divides the same way.

Each kind is reduced as one flat buffer; a parameter without a gradient contributes zeros, so every rank of a
group reduces the same sizes.
"""
from __future__ import annotations

from typing import Iterable

import torch

from trainer.engine.grad_norm import is_expert_parallel
from trainer.parallel.comm import Group, sum_over_
from trainer.parallel.topology import Topology


class GradReduction:
    """reduce(): the gradients of `params` averaged over their data-parallel copies (module docstring)."""

    def __init__(self, params: Iterable[torch.Tensor], topology: Topology):
        params = list(params)
        self._buckets = [([p for p in params if not is_expert_parallel(p)], topology.dp_cp_group),
                         ([p for p in params if is_expert_parallel(p)], topology.edp_group)]
        self._replicas = topology.dp * topology.cp

    def reduce(self) -> None:
        for params, group in self._buckets:
            _average_flat(params, group, self._replicas)


def _average_flat(params: list[torch.Tensor], group: Group, replicas: int) -> None:
    """grad <- (sum over the group of grad) / replicas for every parameter, through one flat buffer."""
    if not params or replicas == 1:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([param.grad.reshape(-1) for param in params])
    sum_over_(flat, group)
    flat /= replicas
    for param, reduced in zip(params, flat.split([param.numel() for param in params])):
        param.grad.copy_(reduced.view_as(param.grad))
