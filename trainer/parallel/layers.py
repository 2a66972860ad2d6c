"""Tensor-parallel layers (Megatron-LM): a linear layer split by columns, one split by rows, and an
embedding split by vocabulary rows.

Every layer builds its weight the same way: the full, unsharded matrix is created on CPU in its canonical
(logical) order, filled by `init_method(full_weight)` and sharded by the parameter's split rule
(trainer/parallel/split.py), so tp=1 and tp=p start from identical weights. Each layer declares those rules,
`split_rules() -> {parameter name: SplitRule}`, which is how checkpoints split and merge its parameters.
Sharded parameters carry `tensor_model_parallel = True` (gradient-norm code counts them on every tensor rank;
replicated ones only on tensor rank 0). Biases start at zero.

With `sequence_parallel=True` (trainer/parallel/sequence.py) the layers meet activations split along the
sequence: a column-parallel layer all-gathers its input [b, s/p, h] in place of copying it, a row-parallel layer
and the embedding reduce-scatter their output to [b, s/p, h] in place of all-reducing it, and the row-parallel
bias, added on this rank's tokens only, has its gradient summed over the group.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError
from trainer.parallel.mappings import (Group, copy_to_tp, gather_from_tp, group_rank, group_size,
                                       reduce_from_tp, scatter_to_tp)
from trainer.parallel.sequence import linear_gathered_sequence, reduce_scatter_to_sequence, sum_grad_over_tp_
from trainer.parallel.split import REPLICATED, SplitRule, declared

InitMethod = Callable[[torch.Tensor], None]


def default_linear_init(weight: torch.Tensor) -> None:
    """nn.Linear's default on the full [out, in] weight: U(-1/sqrt(in), 1/sqrt(in)), default generator."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def default_embedding_init(weight: torch.Tensor) -> None:
    """nn.Embedding's default on the full [V, h] weight: N(0, 1), default generator."""
    nn.init.normal_(weight)


def _partition(size: int, group: Group, what: str) -> int:
    parts = group_size(group)
    if size % parts != 0:
        raise ConfigError(f"{what}={size} is not divisible by the tensor-parallel size {parts}: "
                          f"choose a tensor-parallel size that divides it")
    return size // parts


def sharded_parameter(full_shape: tuple[int, ...], rule: SplitRule, group: Group,
                      init_method: InitMethod) -> nn.Parameter:
    """Build the full weight of full_shape (canonical order) on CPU, fill it with init_method and keep this
    rank's shard by `rule`. Under a meta default device the weight stays on meta (no values, for counting
    parameters)."""
    device = "meta" if torch.empty(0).is_meta else "cpu"
    full = torch.empty(full_shape, dtype=torch.float32, device=device)
    init_method(full)
    param = nn.Parameter(rule.shard(full, group_rank(group), group_size(group)))
    param.tensor_model_parallel = group_size(group) > 1
    return param


class ColumnParallelLinear(nn.Module):
    """Y = XA + b with A [in, out] split by columns, A = [A_1 .. A_p], b = [b_1 .. b_p]:
    rank r computes Y_r = X A_r + b_r. The input is copied to the group (its gradient is all-reduced);
    gather_output=True all-gathers Y = [Y_1 .. Y_p], else each rank keeps Y_r [..., out/p].
    The stored weight is A_r^T [out/p, in], rows r*out/p .. (r+1)*out/p of the full [out, in]. With fused
    `parts` (row counts summing to out: [q; k; v], the halves of a gated MLP) the full weight stacks the parts
    and rank r stores [P_1^(r); ...; P_k^(r)], the r-th of p row blocks of each part (so does its bias), so
    that Y_r splits into this rank's share of every part; gather_output is then refused (it would interleave
    the parts). sequence_parallel=True: X arrives as this rank's tokens [b, s/p, in] and is all-gathered along
    the sequence first (its gradient reduce-scattered)."""

    def __init__(self, in_features: int, out_features: int, *, group: Group, bias: bool = True,
                 gather_output: bool = False, init_method: Optional[InitMethod] = None,
                 parts: Sequence[int] = (), sequence_parallel: bool = False):
        super().__init__()
        if parts and (sum(parts) != out_features or gather_output):
            raise ValueError(f"fused parts {tuple(parts)} must sum to out_features={out_features}, "
                             f"without gather_output")
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.gather_output = gather_output
        self.in_features, self.out_features = in_features, out_features
        for rows in parts:
            _partition(rows, group, "a fused part of out_features")
        self.out_per_rank = _partition(out_features, group, "out_features")
        self.rule = SplitRule(dim=0, part_rows=tuple(parts))
        self.weight = sharded_parameter((out_features, in_features), self.rule, group,
                                        init_method or default_linear_init)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_per_rank))
            self.bias.tensor_model_parallel = group_size(group) > 1
        else:
            self.register_parameter("bias", None)

    def split_rules(self) -> dict[str, SplitRule]:
        return declared(self, {"weight": self.rule, "bias": self.rule})

    def parallel_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x W^T + b on the input every rank multiplies: x itself (its gradient summed over the group), or with
        sequence parallelism x [b, s/p, in] gathered along the sequence (its gradient reduce-scattered; only
        this rank's tokens kept for backward) -> [b, s, out/p]."""
        if self.sequence_parallel:
            return linear_gathered_sequence(x, weight, bias, self.group)
        return F.linear(copy_to_tp(x, self.group), weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] if gather_output else [..., out/p]; with sequence parallelism
        x [b, s/p, in] -> [b, s, out/p]."""
        y = self.parallel_linear(x, self.weight, self.bias)
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = XA + b with A [in, out] split by rows, A = [A_1; ..; A_p], and X split by columns,
    X = [X_1 .. X_p]: Y = sum_r X_r A_r (all-reduce over the group), then + b (b replicated).
    input_is_parallel=False scatters a full X first. The stored weight is A_r^T [out, in/p], columns
    r*in/p .. (r+1)*in/p of the full [out, in]. sequence_parallel=True: the sum is reduce-scattered along the
    sequence, [b, s, out] -> this rank's tokens [b, s/p, out], and b is added to those."""

    def __init__(self, in_features: int, out_features: int, *, group: Group, bias: bool = True,
                 input_is_parallel: bool = True, init_method: Optional[InitMethod] = None,
                 sequence_parallel: bool = False):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("a sequence-parallel row-parallel layer takes its input already split by columns")
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.input_is_parallel = input_is_parallel
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = _partition(in_features, group, "in_features")
        self.weight = sharded_parameter((out_features, in_features), SplitRule(dim=1), group,
                                        init_method or default_linear_init)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
            if sequence_parallel:
                sum_grad_over_tp_(self.bias, group)
        else:
            self.register_parameter("bias", None)

    def split_rules(self) -> dict[str, SplitRule]:
        return declared(self, {"weight": SplitRule(dim=1), "bias": REPLICATED})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in/p] (or [..., in] when not input_is_parallel) -> [..., out], the same on every rank; with
        sequence parallelism x [b, s, in/p] -> this rank's tokens [b, s/p, out]."""
        x_r = x if self.input_is_parallel else scatter_to_tp(x, self.group)
        partial = F.linear(x_r, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence(partial, self.group)
        else:
            y = reduce_from_tp(partial, self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """E[t] with the table E [V, h] split by vocabulary rows: rank r holds rows [vocab_start, vocab_end).
    Each rank looks up the tokens in its range and writes zeros for the rest; the all-reduce over the
    group sums the p partial lookups into E[t] (exactly one rank contributes each token). The table is the
    vocabulary of num_embeddings rows padded with zero rows to num_embeddings_padded, a multiple of
    pad_multiple * p (the parameter's split rule, trainer/parallel/split.py); init_method fills the [V, h] rows.
    sequence_parallel=True reduce-scatters the partial lookups along the sequence instead: each rank gets
    E[t] for its s/p tokens."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: Group, pad_multiple: int = 1,
                 init_method: Optional[InitMethod] = None, sequence_parallel: bool = False):
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.rule = SplitRule.vocabulary(num_embeddings, pad_multiple)
        self.num_embeddings_padded = self.rule.padded_rows(group_size(group))
        per_rank = self.num_embeddings_padded // group_size(group)
        self.vocab_start = group_rank(group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = sharded_parameter((num_embeddings, embedding_dim), self.rule, group,
                                        init_method or default_embedding_init)

    def split_rules(self) -> dict[str, SplitRule]:
        return {"weight": self.rule}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] -> [b, s, h] (with sequence parallelism this rank's tokens [b, s/p, h])."""
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight)  # [b, s, h]
        partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(partial, self.group)
        return reduce_from_tp(partial, self.group)
