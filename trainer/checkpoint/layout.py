"""How each GLM parameter is split over tensor-parallel ranks, and the canonical (layout-free) form.

Canonical names are GLMModel's state-dict names (embedding.word_embeddings.weight,
transformer.layers.{i}.attention.query_key_value.weight, transformer.final_layernorm.bias, ...).
Canonical tensors are full and in logical order:
    query_key_value   [q; k; v] on dim 0: q [n d, h], k and v [g d, h] (g key/value heads; heads as
                      contiguous d_head rows)
    dense_h_to_4h     [a; g] for GeGLU, [gate; up] for SwiGLU (two [f, h] halves), [f, h] for GeLU
    word_embeddings   [V, h], the true vocabulary (no padding rows); so is an untied output_layer.weight
How a canonical tensor splits is not known here by name: every layer declares the split rule of each of its
parameters (trainer/parallel/split.py), and this module reads the rules off a model of the config built on the
meta device (`split_rules`). A new layer type brings its rule with it; nothing here changes.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig
from trainer.model import GLMModel
from trainer.parallel.split import SplitRule, split_rules_of

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


@functools.lru_cache(maxsize=8)
def _meta_model(fields: tuple) -> tuple[dict[str, SplitRule], dict[str, torch.Size]]:
    """(split rules, canonical shapes) of the parameters and persistent buffers of a GLMModel of
    ModelConfig(*fields)."""
    with torch.device("meta"):
        model = GLMModel(ModelConfig(*fields))
    rules = split_rules_of(model)
    shapes = {name: torch.Size((rules[name].vocab_rows, *param.shape[1:])) if rules[name].vocab else param.shape
              for name, param in model.state_dict(keep_vars=True).items()}
    return rules, shapes


def split_rules(config: ModelConfig) -> dict[str, SplitRule]:
    """The split rule of every canonical parameter name of a model of `config`, as its layers declare them."""
    return _meta_model(dataclasses.astuple(config))[0]


def rule_for(name: str, config: ModelConfig) -> SplitRule:
    """The split rule of a canonical parameter name."""
    rules = split_rules(config)
    if name not in rules:
        raise CheckpointError(f"{name} is not a parameter of this model config: the checkpoint was written for "
                              f"another model shape")
    return rules[name]


def shard(full: torch.Tensor, rule: SplitRule, config: ModelConfig, tp: int, tp_rank: int) -> torch.Tensor:
    """A canonical tensor -> tensor-parallel rank tp_rank's shard at size tp (rule.shard; the rule carries all
    it needs, `config` only keeps the callers' form)."""
    return rule.shard(full, tp_rank, tp)


def shard_state(canonical: dict[str, torch.Tensor], config: ModelConfig, tp: int,
                tp_rank: int) -> dict[str, torch.Tensor]:
    """Every canonical tensor -> rank tp_rank's shard."""
    return {name: rule_for(name, config).shard(value, tp_rank, tp) for name, value in canonical.items()}


def merge_states(per_rank: list[dict[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """One state dict per tensor-parallel rank (same names) -> the canonical state dict."""
    return {name: rule_for(name, config).merge([state[name] for state in per_rank]) for name in per_rank[0]}


def canonical_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """The canonical tensor shapes of a config's weights (from a model built on the meta device; the vocabulary
    tensors without padding)."""
    return dict(_meta_model(dataclasses.astuple(config))[1])


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
