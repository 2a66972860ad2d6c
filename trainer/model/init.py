"""Weight initialisation from (seed, stable parameter name), always on the full, unsharded matrix.

Every weight is drawn from its own generator, seeded by the run seed and a name that does not depend on
the layout (e.g. "layers.3.attention.query_key_value"), into the full matrix in its canonical (logical)
order; the parallel layers keep the rank's shard by the parameter's split rule (trainer/parallel/split.py).
So tp=1, tp=2 and every pipeline split start from the same model.

Fused matrices (attention q/k/v, the two GeGLU / SwiGLU halves) are drawn part by part, in order, and stacked
[P_1; P_2; ...]; their split rule gives each rank its rows of every part.
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


def normal_init(seed: int, name: str, std: float) -> InitMethod:
    """N(0, std) on the whole weight."""

    def init(weight: torch.Tensor) -> None:
        if weight.is_meta:  # a meta tensor has no values: counting parameters needs no init
            return
        with torch.no_grad():
            weight.normal_(0.0, std, generator=seeded_generator(seed, name))

    return init


def fused_normal_init(seed: int, name: str, stds: Sequence[float],
                      part_rows: Optional[Sequence[int]] = None) -> InitMethod:
    """A weight made of len(stds) parts stacked on dim 0 (of part_rows rows each; None: equal parts), part i
    drawn N(0, stds[i]) (in order, from one generator)."""

    def init(weight: torch.Tensor) -> None:
        if weight.is_meta:
            return
        generator = seeded_generator(seed, name)
        rows = part_rows or [weight.shape[0] // len(stds)] * len(stds)
        with torch.no_grad():
            for part, std in zip(weight.split(list(rows), dim=0), stds):
                part.normal_(0.0, std, generator=generator)

    return init


def expert_normal_init(seed: int, name: str, std: float) -> InitMethod:
    """N(0, std) on a weight of E experts stacked on dim 0, expert e drawn from its own generator (name.e), so a
    rank that holds some of the experts (expert parallelism) can draw just those, and draws the same values."""

    def init(weight: torch.Tensor) -> None:
        if weight.is_meta:
            return
        with torch.no_grad():
            for expert, values in enumerate(weight):
                values.normal_(0.0, std, generator=seeded_generator(seed, f"{name}.{expert}"))

    return init
