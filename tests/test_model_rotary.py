"""RoPE: rotation preserves norms, and q . k depends only on position differences (1D and 2D)."""
import torch
from torch.testing import assert_close

from trainer.model.config import ModelConfig
from trainer.model.rotary import apply_position_rotary, apply_rotary


def _dot(q, k, p_q, p_k):
    """q, k [d]; positions -> rope(q, p_q) . rope(k, p_k) (float64 for a tight comparison)."""
    rq = apply_rotary(q.view(1, 1, 1, -1), torch.tensor([[p_q]]), 10000.0)
    rk = apply_rotary(k.view(1, 1, 1, -1), torch.tensor([[p_k]]), 10000.0)
    return (rq.double() * rk.double()).sum()


def test_relative_position_property():
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    for shift in (1, 7, 100):
        assert_close(_dot(q, k, 5, 2), _dot(q, k, 5 + shift, 2 + shift), atol=1e-5, rtol=1e-5)
    assert (_dot(q, k, 5, 2) - _dot(q, k, 5, 3)).abs() > 1e-3


def test_rotation_preserves_norm_and_position_zero_is_identity():
    x = torch.randn(2, 3, 4, 8)
    positions = torch.tensor([[0, 1, 2], [3, 40, 500]])
    assert_close(apply_rotary(x, positions, 10000.0).norm(dim=-1), x.norm(dim=-1))
    assert_close(apply_rotary(x, torch.zeros(2, 3, dtype=torch.long), 10000.0), x)


def _rotated_dot(config, q, k, pos_q, block_q, pos_k, block_k):
    def rotate(x, p, bp):
        return apply_position_rotary(x.view(1, 1, 1, -1), torch.tensor([[p]]), torch.tensor([[bp]]), config)

    return (rotate(q, pos_q, block_q).double() * rotate(k, pos_k, block_k).double()).sum()


def test_rope_1d_uses_position_plus_block_position():
    config = ModelConfig(position_embedding="rope_1d")
    x = torch.randn(1, 1, 1, config.head_dim)
    got = apply_position_rotary(x, torch.tensor([[9]]), torch.tensor([[3]]), config)
    assert_close(got, apply_rotary(x, torch.tensor([[12]]), config.rope_base))


def test_rope_2d_depends_on_both_differences_only():
    config = ModelConfig(position_embedding="rope_2d")
    q, k = torch.randn(16), torch.randn(16)
    base = _rotated_dot(config, q, k, 6, 2, 3, 1)
    assert_close(base, _rotated_dot(config, q, k, 16, 5, 13, 4), atol=1e-5, rtol=1e-5)
    assert (base - _rotated_dot(config, q, k, 6, 3, 3, 1)).abs() > 1e-3  # the block difference matters
    assert (base - _rotated_dot(config, q, k, 7, 2, 3, 1)).abs() > 1e-3  # the position difference matters
