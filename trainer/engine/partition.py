"""How the GLM blocks are cut into pipeline stages.

The first stage also runs the word embedding and the last stage the output layer, so each of those
counts as one block's worth of work: N + 2 units are spread evenly and the first and last stage give
one unit to the embedding / output layer. GLM-130B: 70 blocks on 8 stages -> 8, 9, 9, 9, 9, 9, 9, 8.
"""
from __future__ import annotations

from trainer.errors import ConfigError


def blocks_per_stage(num_layers: int, pp: int) -> list[int]:
    """Number of transformer blocks on each of the pp stages (sums to num_layers, each >= 1)."""
    if not 1 <= pp <= num_layers:
        raise ConfigError(f"parallel.pp={pp} must be between 1 and model.num_layers={num_layers}: "
                          f"every pipeline stage needs at least one block")
    if pp == 1:
        return [num_layers]
    units = num_layers + 2
    counts = [units // pp] * pp
    # The remainder of an uneven split goes to the middle stages first: they carry no embedding.
    for stage in (list(range(1, pp - 1)) + [0, pp - 1])[: units % pp]:
        counts[stage] += 1
    counts[0] -= 1
    counts[-1] -= 1
    if min(counts) < 1:
        base, extra = divmod(num_layers, pp)
        return [base + (1 if stage < extra else 0) for stage in range(pp)]
    return counts


def stage_layer_bounds(num_layers: int, pp: int, tail: int = 2) -> list[int]:
    """Boundaries in the flat layer list [embedding, block_1 .. block_N, the `tail` pieces after the last block
    (final norm and output layer; with an MTP layer those and the MTP pieces between them)]: stage i runs layers
    [bounds[i], bounds[i + 1]). The tail runs on the last stage."""
    bounds = [0]
    for stage, blocks in enumerate(blocks_per_stage(num_layers, pp)):
        bounds.append(bounds[-1] + blocks + (1 if stage == 0 else 0))
    bounds[-1] += tail
    return bounds
