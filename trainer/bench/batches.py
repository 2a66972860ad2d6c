"""Synthetic GLM micro-batches in the trainer's real sample format, so that a benchmark needs no corpus.

Every sample is laid out as a [gMASK] sample with sep = s / 2:
    Part A = tokens 0 .. sep - 1:  position_ids 0 .. sep - 1,  block_position_ids 0,  loss_mask 0
    Part B = tokens sep .. s - 1:  position_ids sep - 1 (the blank),  block_position_ids 1 .. s - sep,  loss_mask 1
Token ids and labels are uniform random over the vocabulary: the speed of a step does not depend on them.
"""
from __future__ import annotations

import torch

from trainer.model.mask import segments_of_sep

MicroBatch = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""((input_ids, position_ids, block_position_ids, segments), (labels, loss_mask)): DeepSpeed's pipeline format."""


def synthetic_micro_batch(micro_batch_size: int, seq_length: int, vocab_size: int, seed: int,
                          device: torch.device | str = "cpu") -> MicroBatch:
    """One micro-batch of `micro_batch_size` samples of length `seq_length` (layout in the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    b, s = micro_batch_size, seq_length
    sep = s // 2
    input_ids = torch.randint(0, vocab_size, (b, s), generator=generator)
    labels = torch.randint(0, vocab_size, (b, s), generator=generator)
    index = torch.arange(s)
    part_b = index >= sep
    position_ids = torch.where(part_b, torch.tensor(sep - 1), index).expand(b, s)  # [b, s]
    block_position_ids = torch.where(part_b, index - sep + 1, torch.tensor(0)).expand(b, s)  # [b, s]
    loss_mask = part_b.to(torch.long).expand(b, s)  # [b, s], int64 like the dataset's
    segments = segments_of_sep(torch.full((b,), sep, dtype=torch.long), s)  # [b, 2, s]
    tensors = [input_ids, position_ids.contiguous(), block_position_ids.contiguous(), segments, labels,
               loss_mask.contiguous()]
    input_ids, position_ids, block_position_ids, segments, labels, loss_mask = (t.to(device) for t in tensors)
    return (input_ids, position_ids, block_position_ids, segments), (labels, loss_mask)


def synthetic_step(grad_accum: int, micro_batch_size: int, seq_length: int, vocab_size: int,
                   device: torch.device | str = "cpu") -> list[MicroBatch]:
    """The micro-batches of one optimizer step (each drawn from its own seed)."""
    return [synthetic_micro_batch(micro_batch_size, seq_length, vocab_size, seed, device) for seed in range(grad_accum)]
