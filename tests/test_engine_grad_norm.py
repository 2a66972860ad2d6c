"""The layout-aware gradient norm (trainer/engine/grad_norm.py): which parameters a rank counts, its
accuracy against a float64 reference, and clipping."""
import pytest
import torch
from torch.testing import assert_close

from trainer.engine.grad_norm import clip_grads_, counted_in_norm, global_grad_norm


def _param(grad: torch.Tensor, **flags) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros_like(grad))
    param.grad = grad.clone()
    for key, value in flags.items():
        setattr(param, key, value)
    return param


def wide_range_gradient() -> torch.Tensor:
    """An output-layer-like gradient: every one of 4096 x 32 entries small, a few rows large."""
    grad = torch.full((4096, 32), 1e-3)
    grad[:4] = 0.5
    return grad


def test_the_norm_is_accurate_on_a_wide_range_of_entries():
    grad = wide_range_gradient()
    norm = global_grad_norm([_param(grad)], None, "cpu")
    assert norm.dtype == torch.float32
    # torch.linalg.vector_norm in fp32 is 9.4e-5 off on this tensor on CPU; accumulated in fp64 it is exact
    assert_close(norm.double(), grad.double().norm(), rtol=1e-7, atol=0)


def test_each_weight_is_counted_once_per_replica():
    shard = _param(torch.ones(2), tensor_model_parallel=True)
    replicated = _param(torch.ones(2))
    second_copy = _param(torch.ones(2), ds_pipe_replicated=True)
    params = [shard, replicated, second_copy]
    assert counted_in_norm(params, tp_rank=0) == [shard, replicated]
    assert counted_in_norm(params, tp_rank=1) == [shard]


@pytest.mark.parametrize("max_norm, scale", [(1.0, 1.0 / (5.0 + 1e-6)), (10.0, 1.0), (0.0, 1.0)])
def test_clip_scales_every_gradient_and_returns_the_norm_before(max_norm, scale):
    a, b = _param(torch.tensor([3.0, 0.0])), _param(torch.tensor([0.0, 4.0]))
    norm = clip_grads_([a, b], [a, b], max_norm, None, "cpu")
    assert float(norm) == pytest.approx(5.0)
    assert_close(a.grad, torch.tensor([3.0, 0.0]) * scale)
    assert_close(b.grad, torch.tensor([0.0, 4.0]) * scale)
