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

The cos and sin tables depend on the position ids only, so they are built once per micro-batch (and pipeline
stage), outside any compiled block, and shared by every block for its queries and keys:
`position_rotations_of(position_ids, block_position_ids, config)` -> Rotations, then `rotate(x, rotations, config)`.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from trainer.model.config import ModelConfig

Rotation = tuple[torch.Tensor, torch.Tensor]
"""cos and sin of the angles p * theta_i, fp32 [b, s, 1, r/2] each (the 1 broadcasts over heads)."""

Rotations = tuple[Rotation, ...]
"""A micro-batch's tables: rope_1d one Rotation (of position_ids + block_position_ids), rope_2d two (of
position_ids, then block_position_ids), learned_2d none."""


def rotary_angles(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """positions [b, s] -> angles p * theta_i [b, s, 1, dim/2] (the 1 broadcasts over heads)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)  # [dim/2]
    return (positions.to(torch.float32)[..., None] * inv_freq)[:, :, None, :]  # [b, s, 1, dim/2]


def rotation(positions: torch.Tensor, dim: int, base: float) -> Rotation:
    """positions [b, s] -> (cos, sin) of their angles over `dim` rotated dims, [b, s, 1, dim/2] each."""
    angles = rotary_angles(positions, dim, base)
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor, cos_sin: Rotation, pairing: str) -> torch.Tensor:
    """Rotate every pair (a_i, b_i) of x [..., r] (chosen by pairing) by the angles whose cos, sin [..., r/2]
    are given."""
    if pairing == "interleaved":
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)  # [..., r/2] each: x_{2i}, x_{2i+1}
    else:
        a, b = x.chunk(2, dim=-1)  # [..., r/2] each: x_i, x_{i + r/2}
    cos, sin = cos_sin
    rotated_a, rotated_b = a * cos - b * sin, b * cos + a * sin
    if pairing == "interleaved":
        return torch.stack([rotated_a, rotated_b], dim=-1).flatten(-2)  # [..., r]
    return torch.cat([rotated_a, rotated_b], dim=-1)  # [..., r]


def rotate_dims(x: torch.Tensor, cos_sin: Rotation, pairing: str) -> torch.Tensor:
    """rope on the first r dims of x [b, s, n, d], r = 2 * cos.shape[-1] (the rest pass through); computed in
    fp32, returned in x's dtype."""
    r = 2 * cos_sin[0].shape[-1]
    x32 = x.to(torch.float32)
    rotated = rotate_pairs(x32[..., :r], cos_sin, pairing)
    return torch.cat([rotated, x32[..., r:]], dim=-1).to(x.dtype)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float, pairing: str = "half",
                 rotary_dim: int | None = None) -> torch.Tensor:
    """rope(x, p) on the first rotary_dim dims (default all) of x [b, s, n, d], positions [b, s]; computed in
    fp32, returned in x's dtype."""
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    return rotate_dims(x, rotation(positions, r, base), pairing)


def position_rotations(position_ids: torch.Tensor, block_position_ids: torch.Tensor,
                       config: ModelConfig) -> Rotations:
    """GLM's two position ids [b, s] -> the micro-batch's tables as config.position_embedding says."""
    base = config.rope_base
    if config.position_embedding == "rope_1d":
        return (rotation(position_ids + block_position_ids, config.rotary_dim, base),)
    if config.position_embedding == "rope_2d":
        half = config.head_dim // 2
        return rotation(position_ids, half, base), rotation(block_position_ids, half, base)
    return ()


_latest: Optional[tuple[weakref.ref, int, weakref.ref, int, tuple, Rotations]] = None


def position_rotations_of(position_ids: torch.Tensor, block_position_ids: torch.Tensor,
                          config: ModelConfig) -> Rotations:
    """position_rotations, built once for the blocks of a micro-batch: the last tables built while the same,
    unmodified id tensors and the same rotary settings come back (as GLMMask.of does for the mask)."""
    global _latest
    settings = (config.position_embedding, config.rope_base, config.rotary_dim, config.head_dim)
    latest = _latest
    if (latest is not None and latest[0]() is position_ids and latest[1] == position_ids._version
            and latest[2]() is block_position_ids and latest[3] == block_position_ids._version
            and latest[4] == settings):
        return latest[5]
    rotations = position_rotations(position_ids, block_position_ids, config)
    _latest = (weakref.ref(position_ids), position_ids._version, weakref.ref(block_position_ids),
               block_position_ids._version, settings, rotations)
    return rotations


def rotate(x: torch.Tensor, rotations: Rotations, config: ModelConfig) -> torch.Tensor:
    """Rotate queries or keys x [b, s, n, d] by the micro-batch's tables (position_rotations)."""
    pairing = config.rotary_pairing
    if config.position_embedding == "rope_1d":
        return rotate_dims(x, rotations[0], pairing)
    by_position, by_block = x.chunk(2, dim=-1)  # [b, s, n, d/2] each
    return torch.cat([rotate_dims(by_position, rotations[0], pairing),
                      rotate_dims(by_block, rotations[1], pairing)], dim=-1)


def apply_position_rotary(x: torch.Tensor, position_ids: torch.Tensor, block_position_ids: torch.Tensor,
                          config: ModelConfig) -> torch.Tensor:
    """Rotate queries or keys x [b, s, n, d] by GLM's two position ids as config.position_embedding says."""
    return rotate(x, position_rotations(position_ids, block_position_ids, config), config)
