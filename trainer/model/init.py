"""Weight initialisation from (seed, stable parameter name), always on the full, unsharded matrix.

Every weight is drawn from its own generator, seeded by the run seed and a name that does not depend on
the layout (e.g. "layers.3.attention.query_key_value"), and the parallel layers slice the rank's part out
of the full matrix. So tp=1, tp=2 and every pipeline split start from the same model.

Fused matrices (attention q/k/v, the two GeGLU / SwiGLU halves) are drawn part by part in a layout-free order and
then written rank-major, [P_1^(0); P_2^(0); ...; P_1^(1); P_2^(1); ...], so that the contiguous dim-0
slice a column-parallel layer keeps holds that rank's rows of every part.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional, Sequence

import torch

InitMethod = Callable[[torch.Tensor], None]
"""Fills a full weight [out, in] in place (the contract of trainer.parallel.layers' init_method)."""


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, name); Python's hash() is salted per process."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def xavier_normal_std(gain: float, fan_in: int, fan_out: int) -> float:
    """Std of Xavier-normal init: gain * sqrt(2 / (fan_in + fan_out))."""
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def rank_major(parts: Sequence[torch.Tensor], tp: int) -> torch.Tensor:
    """Stack parts [rows_i, in] (rows_i divisible by tp; grouped-query q, k, v differ) so that rank r's
    contiguous 1/tp of dim 0 is [P_1^(r); ...; P_k^(r)], where P^(r) is the r-th of tp equal row blocks of P."""
    chunks = [part.chunk(tp, dim=0) for part in parts]
    return torch.cat([chunks[i][r] for r in range(tp) for i in range(len(parts))], dim=0)


def split_rank_major(full: torch.Tensor, part_rows: Sequence[int], tp: int) -> list[torch.Tensor]:
    """Inverse of rank_major: the full rank-major matrix back to its logical parts of part_rows rows each."""
    per_rank = [block.split([rows // tp for rows in part_rows], dim=0) for block in full.chunk(tp, dim=0)]
    return [torch.cat([per_rank[r][i] for r in range(tp)], dim=0) for i in range(len(part_rows))]


def normal_init(seed: int, name: str, std: float, rows: Optional[int] = None) -> InitMethod:
    """N(0, std) on the first `rows` rows of the weight (all rows when None); the rows after are zero
    (vocabulary padding). The drawn values do not depend on how many padding rows follow."""

    def init(weight: torch.Tensor) -> None:
        if weight.is_meta:  # a meta tensor has no values: counting parameters needs no init
            return
        count = weight.shape[0] if rows is None else rows
        values = torch.empty(count, *weight.shape[1:], dtype=torch.float32)
        values.normal_(0.0, std, generator=seeded_generator(seed, name))
        with torch.no_grad():
            weight.zero_()
            weight[:count].copy_(values)

    return init


def fused_normal_init(seed: int, name: str, stds: Sequence[float], tp: int,
                      part_rows: Optional[Sequence[int]] = None) -> InitMethod:
    """A weight made of len(stds) parts stacked on dim 0 (of part_rows rows each; None: equal parts), part i
    drawn N(0, stds[i]) (in order, from one generator) and laid out rank-major for tensor-parallel size tp."""

    def init(weight: torch.Tensor) -> None:
        if weight.is_meta:
            return
        generator = seeded_generator(seed, name)
        rows = part_rows or [weight.shape[0] // len(stds)] * len(stds)
        parts = [torch.empty(count, *weight.shape[1:]).normal_(0.0, std, generator=generator)
                 for count, std in zip(rows, stds)]
        with torch.no_grad():
            weight.copy_(rank_major(parts, tp))

    return init
