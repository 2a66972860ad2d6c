"""Rotary position embedding (RoPE, Su et al.), 1D as in GLM-130B, ChatGLM2/3 and GLM-4, and the 2D GLM
variant (ChatGLM-6B).

For a head vector x, a position p and r rotated dims, RoPE rotates r/2 pairs of dims (a_i, b_i) by the angle
p * theta_i, theta_i = base^(-2i/r), i < r/2:
    (a_i, b_i) -> (a_i cos(p theta_i) - b_i sin(p theta_i),  b_i cos(p theta_i) + a_i sin(p theta_i)).
Rotations compose, so rope(q, m) . rope(k, n) depends on m - n only: attention sees relative positions.
Which dims pair up (config.rotary_pairing):
- half: a_i = x_i, b_i = x_{i + r/2} (GLM-130B, ChatGLM-6B);
- interleaved: a_i = x_{2i}, b_i = x_{2i + 1} (GPT-J; ChatGLM2/3, GLM-4, transformers' glm).

- rope_1d rotates the first r = config.rotary_dim dims (all of them unless config.rotary_fraction < 1; the
  rest pass through) by p = position_ids + block_position_ids. In Part A that is the token's index; in a
  Part B span it is the blank's position plus the offset inside the span. For a [gMASK] sample (one blank,
  the last Part A token) this gives sep, sep + 1, ...: exactly GLM-130B's continuing positions, and for a
  causal sample (Part A = [gMASK]) the plain 0, 1, 2, ... of a causal language model.
- rope_2d rotates the first d/2 dims by position_ids and the last d/2 dims by block_position_ids.
"""
from __future__ import annotations

import torch

from trainer.model.config import ModelConfig


def rotary_angles(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """positions [b, s] -> angles p * theta_i [b, s, 1, dim/2] (the 1 broadcasts over heads)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)  # [dim/2]
    return (positions.to(torch.float32)[..., None] * inv_freq)[:, :, None, :]  # [b, s, 1, dim/2]


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor, pairing: str) -> torch.Tensor:
    """Rotate every pair (a_i, b_i) of x [..., r] (chosen by pairing) by angles [..., r/2]."""
    if pairing == "interleaved":
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)  # [..., r/2] each: x_{2i}, x_{2i+1}
    else:
        a, b = x.chunk(2, dim=-1)  # [..., r/2] each: x_i, x_{i + r/2}
    cos, sin = angles.cos(), angles.sin()
    rotated_a, rotated_b = a * cos - b * sin, b * cos + a * sin
    if pairing == "interleaved":
        return torch.stack([rotated_a, rotated_b], dim=-1).flatten(-2)  # [..., r]
    return torch.cat([rotated_a, rotated_b], dim=-1)  # [..., r]


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float, pairing: str = "half",
                 rotary_dim: int | None = None) -> torch.Tensor:
    """rope(x, p) on the first rotary_dim dims (default all) of x [b, s, n, d], positions [b, s]; computed in
    fp32, returned in x's dtype."""
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    angles = rotary_angles(positions, r, base)  # [b, s, 1, r/2]
    x32 = x.to(torch.float32)
    rotated = rotate_pairs(x32[..., :r], angles, pairing)
    return torch.cat([rotated, x32[..., r:]], dim=-1).to(x.dtype)


def apply_position_rotary(x: torch.Tensor, position_ids: torch.Tensor, block_position_ids: torch.Tensor,
                          config: ModelConfig) -> torch.Tensor:
    """Rotate queries or keys x [b, s, n, d] by GLM's two position ids as config.position_embedding says."""
    base, pairing = config.rope_base, config.rotary_pairing
    if config.position_embedding == "rope_1d":
        return apply_rotary(x, position_ids + block_position_ids, base, pairing, config.rotary_dim)
    by_position, by_block = x.chunk(2, dim=-1)  # [b, s, n, d/2] each
    return torch.cat([apply_rotary(by_position, position_ids, base, pairing),
                      apply_rotary(by_block, block_position_ids, base, pairing)], dim=-1)
