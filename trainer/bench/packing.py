"""Real batches from the configured corpus (data.path), with packing on and off, timed on the engine.

For each setting the bench builds the micro-batches of the first optimizer step exactly as training reads
them (rows 0 .. B - 1 of trainer.data.packing.build_sequences, grad_accum micro-batches of
micro_batch_size rows), once, before any timing, so that building samples is not timed. Both settings
give [b, s] micro-batches of the same shape; what differs is how many of the slots hold real tokens:

    padding fraction   = 1 - real tokens / slots          (slots = grad_accum * micro_batch_size * s)
    real tokens/s      = real tokens per step / median step seconds
    packed_vs_unpacked = median over rounds of (packed real tokens/s / unpacked real tokens/s)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch

from trainer.bench.batches import MicroBatch
from trainer.bench.runners import EngineRunner
from trainer.bench.timing import Timings, round_robin, timed
from trainer.config import Config
from trainer.data.dataset import collate
from trainer.data.packing import build_sequences
from trainer.engine.loop import micro_batches
from trainer.parallel.topology import Topology

SETTINGS = {"packed": True, "unpacked": False}
"""Report key -> data.packing."""


@dataclass
class RealStep:
    """The micro-batches of one optimizer step and what they hold."""
    batches: list[MicroBatch]
    real_tokens: int
    """Non-padding slots over the step's rows (the sum of the rows' `tokens`)."""
    samples: int
    """Samples over the step's rows (one per row without packing)."""
    slots: int
    """grad_accum * micro_batch_size * seq_length."""

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / self.slots


def real_step(config: Config, packing: bool, grad_accum: int, topology: Topology,
              device: torch.device | str) -> RealStep:
    """The first optimizer step of `config`'s training rows with data.packing = `packing` (dp = 1), collated and
    normalised by the trainer's code (trainer/engine/loop.py micro_batches), as training reads it."""
    rows = build_sequences(dataclasses.replace(config.data, packing=packing), config.train.seed)
    b = config.parallel.micro_batch_size
    items = [[rows[k] for k in range(micro_step * b, (micro_step + 1) * b)] for micro_step in range(grad_accum)]
    batches, counts = micro_batches([collate(step_rows) for step_rows in items], topology,
                                    mtp=config.model.mtp_layers > 0)
    samples = sum(len(row["starts"]) for step_rows in items for row in step_rows)
    batches = [tuple(tuple(t.to(device) for t in part) for part in batch) for batch in batches]
    return RealStep(batches, int(counts.real_tokens), samples, grad_accum * b * config.data.seq_length)


def time_packing(engine: EngineRunner, steps: dict[str, RealStep], warmup: int, rounds: int) -> dict[str, Timings]:
    """`warmup` untimed steps of each, then `rounds` rounds in which the one engine trains one optimizer step
    on each step's batches in turn -> the timings, by name. The engine's weights move with every step; the
    speed of a step does not depend on them, so one engine serves both (and a second would double the memory)."""
    train = {name: partial(engine.step_on, step.batches) for name, step in steps.items()}
    for step in train.values():
        for _ in range(warmup):
            timed(step)
    return round_robin(train, rounds)
