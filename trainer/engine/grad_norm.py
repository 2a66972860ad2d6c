"""The global gradient norm under tensor, pipeline and data parallelism, counting every weight once.

After the data-parallel all-reduce every data-parallel replica holds the same gradients, so the norm
sums over one replica: tensor-parallel shards on every tensor rank, replicated weights (LayerNorms,
row-parallel biases) on tensor rank 0 only, and the tied word embedding only on the stage that owns it
(DeepSpeed marks the other copy `ds_pipe_replicated`). The squares are summed over the tensor and
pipeline ranks of this replica. Under expert parallelism a replica holds only its E/ep block of each MoE
layer's experts (parameters marked `expert_parallel`): their squares are first summed over the ep group, so
every expert is counted once (the edp copies of one block are equal after the reduction, engine/grad_reduce.py).

On CPU each gradient's norm is accumulated in fp64: PyTorch's fp32 CPU norm kernel loses up to ~1e-4
relative on a tensor of many small entries and a few large ones, which is what an output-layer gradient
is (every vocabulary row gets a little softmax gradient, the batch's tokens a lot): the word embedding's
gradient norm was 3e-5 off, and differently so at tp=1 and tp=2 (half the rows per shard), which made the
logged norms of the two layouts differ by ~1e-5 with equal gradients. On accelerators the norms stay fp32
(their reductions are trees, and some accelerators have no fp64); not measured on one yet.
"""
from __future__ import annotations

from typing import Iterable

import torch

from trainer.engine.deepspeed_compat import is_pipeline_replica
from trainer.parallel.comm import Group, sum_over_


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def is_expert_parallel(param: torch.Tensor) -> bool:
    """Whether `param` is a routed experts' weight, split over the ep group (trainer/parallel/experts.py)."""
    return bool(getattr(param, "expert_parallel", False))


def counted_in_norm(params: Iterable[torch.Tensor], tp_rank: int) -> list[torch.Tensor]:
    """The parameters whose gradients this rank adds to the norm: its tensor-parallel shards, replicated
    weights on tensor rank 0 only, and not the pipeline's second copy of the tied embedding."""
    return [param for param in params if not is_pipeline_replica(param)
            and (is_tensor_parallel(param) or tp_rank == 0)]


def global_grad_norm(counted: list[torch.Tensor], model_parallel_group: Group,
                     device: torch.device | str, ep_group: Group = None) -> torch.Tensor:
    """L2 norm of all gradients of the model (a 0-dim fp32 tensor, the same on every rank of the group),
    from each rank's `counted_in_norm` parameters (fp64 accumulation on CPU: module docstring); the experts'
    squares summed over `ep_group` too (None: ep = 1)."""
    dense = _sum_of_squares([p for p in counted if not is_expert_parallel(p)], device)
    experts = _sum_of_squares([p for p in counted if is_expert_parallel(p)], device)
    squares = dense + sum_over_(experts, group=ep_group)
    return sum_over_(squares, group=model_parallel_group).sqrt()


def _sum_of_squares(params: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """sum_p ||grad_p||^2, a 0-dim fp32 tensor (0 when no parameter has a gradient)."""
    dtype = torch.float64 if torch.device(device).type == "cpu" else None
    norms = [torch.linalg.vector_norm(param.grad, 2.0, dtype=dtype) for param in params if param.grad is not None]
    return torch.stack(norms).square().sum().float() if norms else torch.zeros((), device=device)


def clip_grads_(params: list[torch.Tensor], counted: list[torch.Tensor], max_norm: float,
                model_parallel_group: Group, device: torch.device | str, ep_group: Group = None) -> torch.Tensor:
    """Scale the gradient of every parameter in `params` by min(1, max_norm / (norm + 1e-6)) in place, the
    norm over every rank's `counted` (experts over `ep_group` too); returns the norm before clipping."""
    norm = global_grad_norm(counted, model_parallel_group, device, ep_group)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm
