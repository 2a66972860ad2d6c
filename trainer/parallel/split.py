"""How a tensor-parallel parameter splits over the ranks and merges back: the layers declare it, the
checkpoint code reads it (Megatron's `sharded_state_dict`, in small).

Every layer that owns parameters (or persistent buffers) says how each splits, `split_rules() -> {name: SplitRule}`, naming its own
parameters (or those of plain torch children it builds, such as an nn.Embedding) relative to itself.
`split_rules_of(module)` collects them under the module's parameter names and refuses a parameter that no
layer declares, so a new layer type brings its rule with it and the checkpoint code needs no change.

A rule maps the full tensor in its canonical (logical, layout-free) order to the shard tensor-parallel rank r
of p holds, and back:
    replicated   every rank holds the full tensor (norms, row-parallel biases, position tables)
    dim d        rank r holds the r-th of p contiguous slices of dim d (column-parallel: 0, row-parallel: 1)
    fused parts  dim d stacks parts of part_rows rows ([q; k; v], the two GeGLU / SwiGLU halves: dim 0; the
                 gate and up halves of every routed expert's [E, 2f, h] weight: dim 1); rank r holds
                 [P_1^(r); ...; P_k^(r)], the r-th of p row blocks of every part (rank-major), so it splits its
                 own output into the parts with no communication
    vocabulary   dim 0 is a vocabulary of vocab_rows rows, padded with zero rows to a multiple of
                 pad_multiple * p (Megatron's rule) and then split; a merge drops the padding
The layers build their weights through the same rule (sharded_parameter), so a model built at size p holds
exactly rule.shard(full, r, p) of the full weight it would hold at size 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class SplitRule:
    """dim: the split dimension (None: replicated); part_rows: the rows of each fused part stacked on dim `dim`
    (empty: not fused); vocab_rows: dim 0 is a vocabulary of this many rows, padded to a multiple of
    pad_multiple * size before the split (None: no vocabulary)."""
    dim: Optional[int] = None
    part_rows: tuple[int, ...] = ()
    vocab_rows: Optional[int] = None
    pad_multiple: int = 1

    def __post_init__(self) -> None:
        if self.part_rows and self.dim is None:
            raise ValueError("fused parts need a split dim")
        if self.vocab_rows is not None and self.dim != 0:
            raise ValueError(f"vocabularies are split on dim 0, not {self.dim}")
        if self.part_rows and self.vocab_rows is not None:
            raise ValueError("a split rule is a vocabulary or fused parts, not both")

    @classmethod
    def vocabulary(cls, rows: int, pad_multiple: int = 1) -> "SplitRule":
        """A vocabulary of `rows` rows on dim 0, padded to a multiple of pad_multiple * size."""
        return cls(dim=0, vocab_rows=rows, pad_multiple=pad_multiple)

    @property
    def vocab(self) -> bool:
        return self.vocab_rows is not None

    def padded_rows(self, size: int) -> int:
        """The vocabulary rounded up to a multiple of pad_multiple * size (ModelConfig.padded_vocab_size)."""
        multiple = self.pad_multiple * size
        return multiple * math.ceil(self.vocab_rows / multiple)

    def shard_shape(self, full_shape: Sequence[int], size: int) -> tuple[int, ...]:
        """The shape of every rank's shard of a full tensor of full_shape at size `size`."""
        shape = list(full_shape)
        if self.dim is None:
            return tuple(shape)
        if self.vocab:
            shape[0] = self.padded_rows(size)
        shape[self.dim] //= size
        return tuple(shape)

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """The full (canonical) tensor -> rank `rank`'s shard at size `size` (a new tensor unless replicated)."""
        if self.dim is None:
            return full
        if self.part_rows:
            rows = full.movedim(self.dim, 0)  # the fused dim first
            blocks = [part.chunk(size, dim=0)[rank] for part in rows.split(self.part_rows, dim=0)]  # P_i^(r)
            return _stack_rows(blocks).movedim(0, self.dim).contiguous()  # [P_1^(r); ...; P_k^(r)] on dim `dim`
        if self.vocab:
            rows = self.padded_rows(size) // size
            shard = full.new_zeros(rows, *full.shape[1:])  # [V_pad / size, h]: the rows past the vocabulary stay 0
            real = full[rank * rows:(rank + 1) * rows]
            shard[:real.shape[0]] = real
            return shard
        return full.chunk(size, dim=self.dim)[rank].clone()

    def merge(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Every rank's shard, in rank order -> the full (canonical) tensor."""
        if self.dim is None:
            return shards[0]
        full = torch.cat(list(shards), dim=self.dim)
        if self.part_rows:
            parts = split_rank_major(full.movedim(self.dim, 0), self.part_rows, len(shards))
            return torch.cat(parts, dim=0).movedim(0, self.dim).contiguous()
        if self.vocab:
            return full[:self.vocab_rows].clone()
        return full


def _stack_rows(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat(blocks) on dim 0, written into one new tensor: torch.cat of meta tensors is hundreds of times
    slower, and a model built on the meta device passes through here."""
    stacked = blocks[0].new_empty(sum(block.shape[0] for block in blocks), *blocks[0].shape[1:])
    start = 0
    for block in blocks:
        stacked[start:start + block.shape[0]].copy_(block)
        start += block.shape[0]
    return stacked


REPLICATED = SplitRule()
"""Every rank holds the whole tensor."""


def declared(layer: nn.Module, rules: dict[str, SplitRule]) -> dict[str, SplitRule]:
    """The rules of a layer's own parameters, less those it left unset (a bias of None)."""
    return {name: rule for name, rule in rules.items() if getattr(layer, name) is not None}


def split_rank_major(full: torch.Tensor, part_rows: Sequence[int], tp: int) -> list[torch.Tensor]:
    """The rank-major stack of tp shards [P_1^(r); ...; P_k^(r)] -> the parts P_1 .. P_k (part_rows rows each)."""
    per_rank = [block.split([rows // tp for rows in part_rows], dim=0) for block in full.chunk(tp, dim=0)]
    return [torch.cat([per_rank[r][i] for r in range(tp)], dim=0) for i in range(len(part_rows))]


def state_tensor_names(module: nn.Module) -> list[str]:
    """The names of what a checkpoint of `module` holds: its parameters and its persistent buffers (the MoE
    router's expert_bias), as in module.state_dict()."""
    names = list(dict(module.named_parameters()))
    return names + [name for name in module.state_dict(keep_vars=True) if name not in names]


def split_rules_of(module: nn.Module) -> dict[str, SplitRule]:
    """The rule of every parameter and persistent buffer of `module` (state_tensor_names), from the
    split_rules() of the layers that own them. Raises TypeError naming a parameter that no layer declares
    (give its layer a split_rules()) or a declared name that is not a parameter or a persistent buffer."""
    rules: dict[str, SplitRule] = {}
    for prefix, layer in module.named_modules():
        declare = getattr(layer, "split_rules", None)
        if declare is None:
            continue
        for name, rule in declare().items():
            rules[f"{prefix}.{name}" if prefix else name] = rule
    parameters = state_tensor_names(module)
    undeclared = [name for name in parameters if name not in rules]
    if undeclared:
        raise TypeError(f"{undeclared[0]} has no tensor-parallel split rule: its layer must declare it in "
                        f"split_rules() (trainer/parallel/split.py)")
    unknown = [name for name in rules if name not in parameters]
    if unknown:
        raise TypeError(f"split_rules() declares {unknown[0]}, which is not a parameter or a persistent buffer of "
                        f"the module")
    return rules
