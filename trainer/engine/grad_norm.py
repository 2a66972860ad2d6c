"""The global gradient norm under tensor, pipeline and data parallelism, counting every weight once.

After the data-parallel all-reduce every data-parallel replica holds the same gradients, so the norm
sums over one replica: tensor-parallel shards on every tensor rank, replicated weights (LayerNorms,
row-parallel biases) on tensor rank 0 only, and the tied word embedding only on the stage that owns it
(DeepSpeed marks the other copy `ds_pipe_replicated`). The squares are summed over the tensor and
pipeline ranks of this replica.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def counted_in_norm(params: Iterable[torch.Tensor], tp_rank: int) -> list[torch.Tensor]:
    """The parameters whose gradients this rank adds to the norm: its tensor-parallel shards, replicated
    weights on tensor rank 0 only, and not the pipeline's second copy of the tied embedding."""
    return [param for param in params if not getattr(param, "ds_pipe_replicated", False)
            and (is_tensor_parallel(param) or tp_rank == 0)]


def global_grad_norm(counted: list[torch.Tensor], model_parallel_group: Optional[dist.ProcessGroup],
                     device: torch.device | str) -> torch.Tensor:
    """L2 norm of all gradients of the model (a 0-dim fp32 tensor, the same on every rank of the group),
    from each rank's `counted_in_norm` parameters (fp32 gradients: the per-tensor norms are taken in the
    gradients' dtype)."""
    grads = [param.grad for param in counted if param.grad is not None]
    local = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True) if grads else torch.zeros((), device=device)
    squares = local.float().square()
    if model_parallel_group is not None and dist.get_world_size(model_parallel_group) > 1:
        dist.all_reduce(squares, group=model_parallel_group)
    return squares.sqrt()


def clip_grads_(params: list[torch.Tensor], counted: list[torch.Tensor], max_norm: float,
                model_parallel_group: Optional[dist.ProcessGroup], device: torch.device | str) -> torch.Tensor:
    """Scale the gradient of every parameter in `params` by min(1, max_norm / (norm + 1e-6)) in place, the
    norm over every rank's `counted`; returns the norm before clipping."""
    norm = global_grad_norm(counted, model_parallel_group, device)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm
