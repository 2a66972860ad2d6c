"""Rotary position embedding (RoPE, Su et al.), 1D as in GLM-130B and the 2D GLM variant.

For a head vector x in R^d and an integer position p, RoPE rotates the pairs (x_i, x_{i + d/2}) by the
angle p * theta_i, theta_i = base^(-2i/d), i < d/2:
    rope(x, p) = x * cos(p theta) + rotate_half(x) * sin(p theta),   rotate_half([x1, x2]) = [-x2, x1].
Rotations compose, so rope(q, m) . rope(k, n) depends on m - n only: attention sees relative positions.

- rope_1d rotates all d dims by p = position_ids + block_position_ids. In Part A that is the token's index;
  in a Part B span it is the blank's position plus the offset inside the span. For a [gMASK] sample
  (one blank, the last Part A token) this gives sep, sep + 1, ...: exactly GLM-130B's continuing positions.
- rope_2d rotates the first d/2 dims by position_ids and the last d/2 dims by block_position_ids.
"""
from __future__ import annotations

import torch

from trainer.model.config import ModelConfig


def rotary_angles(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """positions [b, s] -> angles [b, s, 1, dim] (p * theta_i, repeated for both halves; 1 broadcasts over heads)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)  # [dim/2]
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [b, s, dim/2]
    return torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [b, s, 1, dim]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """rope(x, p) for x [b, s, n, d] and positions [b, s]; computed in fp32, returned in x's dtype."""
    angles = rotary_angles(positions, x.shape[-1], base)  # [b, s, 1, d]
    x32 = x.to(torch.float32)
    return (x32 * angles.cos() + rotate_half(x32) * angles.sin()).to(x.dtype)


def apply_position_rotary(x: torch.Tensor, position_ids: torch.Tensor, block_position_ids: torch.Tensor,
                          config: ModelConfig) -> torch.Tensor:
    """Rotate queries or keys x [b, s, n, d] by GLM's two position ids as config.position_embedding says."""
    if config.position_embedding == "rope_1d":
        return apply_rotary(x, position_ids + block_position_ids, config.rope_base)
    by_position, by_block = x.chunk(2, dim=-1)  # [b, s, n, d/2] each
    return torch.cat([apply_rotary(by_position, position_ids, config.rope_base),
                      apply_rotary(by_block, block_position_ids, config.rope_base)], dim=-1)
