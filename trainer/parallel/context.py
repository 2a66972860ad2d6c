"""Context parallelism: each row's sequence split over the cp ranks, attention over the whole row.

The split (load-balanced, as Megatron-LM and TransformerEngine do): a row of s tokens is cut into 2 cp chunks of
c = s / (2 cp) tokens, and context-parallel rank r holds chunk r and chunk 2 cp - 1 - r, in that order:

    s = 8, cp = 2:  chunks [0 1 | 2 3 | 4 5 | 6 7]   rank 0: positions 0 1 6 7   rank 1: positions 2 3 4 5

A causal or GLM mask gives the late positions more keys; pairing a head chunk with a tail chunk gives every
rank about the same work. Every per-token tensor of a micro-batch (token, position and segment ids, labels,
loss mask) is split once, where the batch enters the model (`split_row`), so positions (learned 2D, rotary 1D
or 2D, partial) are those of the chunk's own tokens and the segments keep the absolute indices of the row.

Attention (Llama 3's all-gather context parallelism, exact for document and GLM masks): each rank computes its
queries' rows against the keys and values of the whole row, all-gathered over the cp ranks and put back in row
order (`gather_row`). Its cost, per attention layer: every rank holds the full K and V of the row (2 s g d
values per head group, s/cp of them its own), one all-gather of K and V in forward and one reduce-scatter of
their gradients in backward (the gradient of each rank's K/V chunk summed over the ranks whose queries read
it), ((cp - 1) / cp) 2 s g d values each way per rank. The queries, the scores and everything outside attention
stay at s / cp tokens.
"""
from __future__ import annotations

import torch

from trainer.parallel.comm import Group, group_rank, group_size
from trainer.parallel.mappings import gather_rows_from_tp


def chunk_positions(seq_length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The row positions held by context-parallel rank `rank` of `cp`, in its local order: chunk `rank`, then
    chunk 2 cp - 1 - rank, each of seq_length / (2 cp) consecutive positions -> [seq_length / cp] int64."""
    if seq_length % (2 * cp):
        raise ValueError(f"a row of {seq_length} tokens does not split into 2 * cp = {2 * cp} equal chunks")
    c = seq_length // (2 * cp)
    head = torch.arange(rank * c, (rank + 1) * c, device=device)
    tail = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([head, tail])


def row_order(seq_length: int, cp: int, device=None) -> torch.Tensor:
    """The permutation that puts the ranks' chunks, concatenated in rank order, back in row order:
    cat(chunk_positions(s, cp, r) for r)[row_order] = arange(s)."""
    gathered = torch.cat([chunk_positions(seq_length, cp, r, device) for r in range(cp)])  # [s]: rank order
    return torch.argsort(gathered)


def split_row(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """This rank's chunks of a per-token tensor: [..., s, ...] -> [..., s / cp, ...] on `dim` (chunk_positions);
    the identity without context parallelism. Data, not activations: no gradient flows through it."""
    cp = group_size(group)
    if cp == 1:
        return x
    positions = chunk_positions(x.shape[dim], cp, group_rank(group), device=x.device)
    return x.index_select(dim, positions)


def gather_row(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """forward: all-gather every rank's chunks on `dim` and put them in row order ([..., s / cp, ...] ->
    [..., s, ...]); backward: the gradient reduce-scattered (summed over the ranks, this rank's chunks kept).
    The identity without context parallelism."""
    cp = group_size(group)
    if cp == 1:
        return x
    rows = x.movedim(dim, 0)  # [s / cp, ...]
    gathered = gather_rows_from_tp(rows, group)  # [s, ...] in rank order: every rank's local chunks
    full = gathered.index_select(0, row_order(gathered.shape[0], cp, device=x.device))  # [s, ...] in row order
    return full.movedim(0, dim)
