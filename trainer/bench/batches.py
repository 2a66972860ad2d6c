"""Synthetic GLM micro-batches made by the trainer's own batch code, so that a benchmark needs no corpus and
every contender computes the loss the trainer computes.

Every row holds one [gMASK] sample with sep = s / 2, in the data layer's row format (trainer/data/packing.py):
    Part A = tokens 0 .. sep - 1:  position_ids 0 .. sep - 1,  block_position_ids 0,  loss_mask 0
    Part B = tokens sep .. s - 1:  position_ids sep - 1 (the blank),  block_position_ids 1 .. s - sep,  loss_mask 1
Token ids and labels are uniform random over the vocabulary: the speed of a step does not depend on them.
The rows go through the trainer's collate (trainer/data/dataset.py: the loss positions and token counts) and
its micro_batches (trainer/engine/loop.py: the step's loss normaliser, DeepSpeed's pipeline format), as
training reads them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from trainer.data.dataset import collate
from trainer.engine.loop import micro_batches
from trainer.parallel.topology import Topology

MicroBatch = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]
"""((input_ids, position_ids, block_position_ids, segments[, next_input_ids]), (labels, loss_mask, normaliser,
loss_positions[, the MTP layer's normaliser, labels, loss mask])):
DeepSpeed's pipeline format as trainer.engine.loop.pipeline_format makes it."""


def synthetic_row(seq_length: int, vocab_size: int, rng: np.random.Generator) -> dict:
    """One row of one [gMASK] sample (layout in the module docstring), as trainer/data/packing.py's pack() makes
    rows: int64 arrays [s], `tokens` (all s real) and `starts`."""
    s, sep = seq_length, seq_length // 2
    index = np.arange(s, dtype=np.int64)
    part_b = index >= sep
    return {"input_ids": rng.integers(0, vocab_size, s, dtype=np.int64),
            "labels": rng.integers(0, vocab_size, s, dtype=np.int64),
            "loss_mask": part_b.astype(np.int64),
            "position_ids": np.where(part_b, sep - 1, index),
            "block_position_ids": np.where(part_b, index - sep + 1, 0),
            "segment_start": np.zeros(s, dtype=np.int64), "segment_sep": np.full(s, sep, dtype=np.int64),
            "tokens": s, "starts": [0]}


def synthetic_step(grad_accum: int, micro_batch_size: int, seq_length: int, vocab_size: int,
                   topology: Optional[Topology] = None, device: torch.device | str = "cpu",
                   seed: int = 0, mtp: bool = False) -> list[MicroBatch]:
    """The micro-batches of one optimizer step of a data-parallel rank of `topology` (default: one process) at
    dp = 1: grad_accum micro-batches of micro_batch_size rows, collated and normalised by the trainer's code (module
    docstring), on `device`; with `mtp` (a model with an MTP layer) they carry its fields too (pipeline_format)."""
    topology = topology or Topology.single()
    rng = np.random.default_rng(seed)
    collated = [collate([synthetic_row(seq_length, vocab_size, rng) for _ in range(micro_batch_size)])
                for _ in range(grad_accum)]
    batches, _ = micro_batches(collated, topology, mtp)
    return [tuple(tuple(t.to(device) for t in part) for part in batch) for batch in batches]
