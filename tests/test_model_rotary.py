"""RoPE: rotation preserves norms, q . k depends only on position differences (1D and 2D), and both pairings
with partial rotation equal the complex-number formula."""
import pytest
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


def _complex_rotation(x: torch.Tensor, p: int, r: int, pairing: str, base: float = 10000.0) -> torch.Tensor:
    """The formula on one head vector x [d] in float64: pair i as the complex number a_i + i b_i, times
    exp(i p theta_i), theta_i = base^(-2i/r), on the first r dims; the rest unchanged."""
    x = x.double()
    rotated = x[:r]
    a, b = (rotated[0::2], rotated[1::2]) if pairing == "interleaved" else (rotated[:r // 2], rotated[r // 2:])
    theta = base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    z = torch.complex(a, b) * torch.exp(1j * p * theta)
    if pairing == "interleaved":
        out = torch.stack([z.real, z.imag], dim=-1).flatten()
    else:
        out = torch.cat([z.real, z.imag])
    return torch.cat([out, x[r:]])


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_partial_rotary_in_both_pairings_is_the_complex_rotation(pairing, fraction):
    config = ModelConfig(hidden_size=64, num_attention_heads=4, position_embedding="rope_1d",
                         rotary_fraction=fraction, rotary_pairing=pairing)
    torch.manual_seed(0)
    x = torch.randn(1, 1, 1, 16)
    got = apply_position_rotary(x, torch.tensor([[5]]), torch.tensor([[2]]), config)[0, 0, 0]
    want = _complex_rotation(x[0, 0, 0], 7, config.rotary_dim, pairing)
    assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    if fraction < 1:
        assert torch.equal(got[config.rotary_dim:], x[0, 0, 0, config.rotary_dim:])  # passed through unrotated
