"""The canonical layout read from the layers' split rules, for the model shape of every configs/*.yaml (shrunk,
its switches kept: GLM, GLM-130B's GeGLU and DeepNorm, ChatGLM-6B's padded vocabulary, ChatGLM3 / GLM-4's
grouped-query attention, SwiGLU and untied output) and a multi-query variant: at tp 1, 2 and 4 the rules shard
the tp = 1 weights into exactly what a model built at that tp holds and merge them back bit for bit, and they
are the rules of the name table that existing checkpoints were written with."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from trainer.checkpoint.layout import (WORD_EMBEDDINGS, canonical_shapes, merge_states, rule_for, shard_state,
                                       split_rules)
from trainer.config import load_config
from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig
from trainer.model.glm import GLMModel
from trainer.model.output import OUTPUT_WEIGHT
from trainer.parallel.split import REPLICATED, SplitRule, split_rules_of

CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
SIZES = (1, 2, 4)


def _small(model: ModelConfig, **changes) -> ModelConfig:
    """The same switches at a width every tp in SIZES splits: 8 heads of 8 dims, vocabulary 100 (padded)."""
    small = dataclasses.replace(model, num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=100,
                                max_sequence_length=16, **changes)
    if model.ffn_hidden_size is not None:
        small.ffn_hidden_size = 48
    if model.kv_channels is not None:  # heads of another width than hidden / heads (GLM-4.5) stay so
        small.kv_channels = 16
    if model.moe_num_experts:  # a dense first block, then MoE blocks of 4 experts (top-2) 16 wide
        small.moe_num_experts, small.moe_top_k = 4, 2
        small.moe_first_dense_layers, small.moe_ffn_hidden_size = 1, 16
    return small


def _shapes() -> dict[str, ModelConfig]:
    shapes = {path.stem: _small(load_config(path).model) for path in CONFIGS}
    shapes["chatglm3-6b, multi-query"] = _small(load_config("configs/chatglm3-6b.yaml").model, num_key_value_heads=1)
    return shapes


SHAPES = _shapes()


def _name_table_rule(name: str, config: ModelConfig) -> SplitRule:
    """The parameter-name table checkpoints were split by before the layers declared their rules."""
    if name in (WORD_EMBEDDINGS, OUTPUT_WEIGHT):
        return SplitRule.vocabulary(config.vocab_size, config.vocab_pad_multiple)
    if name.endswith(("attention.query_key_value.weight", "attention.query_key_value.bias")):
        return SplitRule(dim=0, part_rows=config.qkv_rows)
    if name.endswith(("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")):
        return SplitRule(dim=0, part_rows=(config.ffn_size,) * 2 if config.gated_mlp else ())
    if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
        return SplitRule(dim=1)
    return REPLICATED


def test_the_shapes_cover_every_switch_that_changes_a_split():
    configs = SHAPES.values()
    assert {config.mlp for config in configs} == {"gelu", "geglu", "swiglu"}
    assert {config.num_kv_heads for config in configs} >= {1, 2, 8}
    assert {config.tie_word_embeddings for config in configs} == {True, False}
    assert {config.add_bias_linear for config in configs} == {True, False}
    assert {config.vocab_pad_multiple for config in configs} >= {16, 128}
    assert {config.position_embedding for config in configs} == {"learned_2d", "rope_1d", "rope_2d"}


@pytest.mark.parametrize("shape", [shape for shape, config in SHAPES.items() if not config.moe_num_experts])
def test_the_layers_declare_the_rules_existing_checkpoints_were_split_by(shape):
    """Dense shapes: the name table predates the mixture-of-experts layers, whose rules only their layers state."""
    config = SHAPES[shape]
    rules = split_rules(config)
    assert rules.keys() == GLMModel(config).state_dict().keys()
    assert rules == {name: _name_table_rule(name, config) for name in rules}


@pytest.mark.parametrize("shape", SHAPES)
def test_shard_then_merge_is_the_identity_at_every_tp(shape):
    config = SHAPES[shape]
    canonical = merge_states([GLMModel(config, seed=1).state_dict()], config)
    assert canonical[WORD_EMBEDDINGS].shape[0] == config.vocab_size
    assert {name: value.shape for name, value in canonical.items()} == canonical_shapes(config)
    for tp in SIZES:
        config.validate(tp)
        shards = [shard_state(canonical, config, tp, rank) for rank in range(tp)]
        assert shards[0][WORD_EMBEDDINGS].shape[0] * tp == config.padded_vocab_size(tp)
        merged = merge_states(shards, config)
        assert merged.keys() == canonical.keys()
        assert all(torch.equal(merged[name], value) for name, value in canonical.items())


def test_a_name_the_model_does_not_have_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="transformer.layers.9.mlp.dense_h_to_4h.weight is not a parameter"):
        rule_for("transformer.layers.9.mlp.dense_h_to_4h.weight", SHAPES["glm-debug"])


def _built_models_hold_the_shards(rank: int, world_size: int) -> None:
    groups = {1: None, 2: None, 4: dist.new_group(list(range(4)))}
    for ranks in ([0, 1], [2, 3]):
        group = dist.new_group(ranks)  # every rank takes part in creating every group
        if rank in ranks:
            groups[2] = group
    for shape, config in SHAPES.items():
        canonical = merge_states([GLMModel(config, seed=1).state_dict()], config)
        for tp in SIZES:
            model = GLMModel(config, groups[tp], seed=1)
            assert split_rules_of(model) == split_rules(config), shape
            built, expected = model.state_dict(), shard_state(canonical, config, tp, rank % tp)
            assert built.keys() == expected.keys()
            different = [name for name, value in expected.items() if not torch.equal(built[name], value)]
            assert not different, f"{shape} at tp {tp}: {different[:3]}"


def test_a_model_built_at_tp_holds_exactly_the_rule_shards_of_the_tp1_weights():
    run_distributed(_built_models_hold_the_shards, 4)
