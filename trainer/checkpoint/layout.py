"""How each GLM parameter is split over tensor-parallel ranks, and the canonical (layout-free) form.

Canonical names are GLMModel's state-dict names (embedding.word_embeddings.weight,
transformer.layers.{i}.attention.query_key_value.weight, transformer.final_layernorm.bias, ...).
Canonical tensors are full and in logical order:
    query_key_value   [q; k; v] on dim 0: q [n d, h], k and v [g d, h] (g key/value heads; heads as
                      contiguous d_head rows)
    dense_h_to_4h     [a; g] for GeGLU, [gate; up] for SwiGLU (two [f, h] halves), [f, h] for GeLU
    word_embeddings   [V, h], the true vocabulary (no padding rows); so is an untied output_layer.weight
A rank's shard of a column-parallel fused weight is rank-major, [P_1^(r); ...; P_k^(r)] where P^(r) is
the r-th of tp row blocks of part P (trainer/model/init.py); a row-parallel weight is split on dim 1;
the vocabulary is padded with zero rows to ModelConfig.padded_vocab_size(tp) and split on dim 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.model.config import ModelConfig
from trainer.model.init import rank_major, split_rank_major
from trainer.model.output import OUTPUT_WEIGHT

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


@dataclass(frozen=True)
class SplitRule:
    """dim: the split dimension (None = replicated); part_rows: the rows of each fused part stacked on dim 0
    (empty: not fused); vocab: the dim-0 rows are the vocabulary, padded per tensor-parallel size."""
    dim: int | None = None
    part_rows: tuple[int, ...] = ()
    vocab: bool = False


REPLICATED = SplitRule()


def rule_for(name: str, config: ModelConfig) -> SplitRule:
    """The split rule of a canonical parameter name."""
    if name in (WORD_EMBEDDINGS, OUTPUT_WEIGHT):
        return SplitRule(dim=0, vocab=True)
    if name.endswith(("attention.query_key_value.weight", "attention.query_key_value.bias")):
        return SplitRule(dim=0, part_rows=config.qkv_rows)
    if name.endswith(("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")):
        return SplitRule(dim=0, part_rows=(config.ffn_size,) * 2 if config.gated_mlp else ())
    if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
        return SplitRule(dim=1)
    return REPLICATED


def shard(full: torch.Tensor, rule: SplitRule, config: ModelConfig, tp: int, tp_rank: int) -> torch.Tensor:
    """A canonical tensor -> tensor-parallel rank tp_rank's shard at size tp."""
    if rule.dim is None:
        return full
    if rule.vocab:
        padded = full.new_zeros(config.padded_vocab_size(tp), *full.shape[1:])  # [V_pad, h]
        padded[:full.shape[0]] = full
        full = padded
    elif rule.part_rows:
        full = rank_major(full.split(rule.part_rows, dim=0), tp)
    return full.chunk(tp, dim=rule.dim)[tp_rank].clone()


def merge(shards: list[torch.Tensor], rule: SplitRule, config: ModelConfig) -> torch.Tensor:
    """All tensor-parallel ranks' shards, in rank order -> the canonical tensor."""
    if rule.dim is None:
        return shards[0]
    full = torch.cat(shards, dim=rule.dim)
    if rule.vocab:
        return full[:config.vocab_size].clone()
    if rule.part_rows:
        return torch.cat(split_rank_major(full, rule.part_rows, len(shards)), dim=0)
    return full


def shard_state(canonical: dict[str, torch.Tensor], config: ModelConfig, tp: int,
                tp_rank: int) -> dict[str, torch.Tensor]:
    """Every canonical tensor -> rank tp_rank's shard."""
    return {name: shard(value, rule_for(name, config), config, tp, tp_rank) for name, value in canonical.items()}


def canonical_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """The canonical tensor shapes of a config's weights (from a model built on the meta device)."""
    from trainer.model import GLMModel

    with torch.device("meta"):
        state = GLMModel(config).state_dict()
    shapes = {name: value.shape for name, value in state.items()}
    shapes[WORD_EMBEDDINGS] = torch.Size([config.vocab_size, config.hidden_size])
    return shapes


def shape_mismatches(shards: dict[str, torch.Size], config: ModelConfig, tp: int = 1) -> list[str]:
    """How tensor-parallel rank 0's shard shapes at size tp (tp = 1: canonical shapes) differ from what `config`
    describes, in canonical terms: missing and unexpected tensors, and tensors of another shape (both named).
    The vocabulary rows may exceed config.vocab_size (padding) but not fall short of it."""
    expected = canonical_shapes(config)
    problems = [f"{name} missing" for name in expected if name not in shards]
    problems += [f"{name} unexpected" for name in shards if name not in expected]
    for name, shape in expected.items():
        rule = rule_for(name, config)
        if name not in shards or rule.dim is None and shards[name] == shape:
            continue
        whole = list(shards[name])
        if rule.dim is not None and rule.dim < len(whole):
            whole[rule.dim] *= tp
        fits = whole[0] >= shape[0] and whole[1:] == list(shape[1:]) if rule.vocab else whole == list(shape)
        if not fits:
            problems.append(f"{name} is {whole}, the config needs {list(shape)}")
    return problems


def merge_states(per_rank: list[dict[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """One state dict per tensor-parallel rank (same names) -> the canonical state dict."""
    return {name: merge([state[name] for state in per_rank], rule_for(name, config), config)
            for name in per_rank[0]}
