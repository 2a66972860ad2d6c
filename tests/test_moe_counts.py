"""GLM-4.5's parameter counts in closed form (ModelConfig.num_parameters / active_parameters): the totals without
the MTP layer equal transformers' counts of the published configs, the active and MTP counts equal hand counts, a
small MoE model built on the meta device has exactly the closed-form count, and the FLOPs per token are twice the
active matrix parameters plus the attention scores."""
import dataclasses
import re

import pytest
import torch

from tests.glm_processes import run_train
from trainer.config import load_config
from trainer.engine.flops import forward_flops_per_token, train_flops_per_token
from trainer.errors import ConfigError
from trainer.model.config import ModelConfig
from trainer.model.counts import count_summary

PUBLISHED = {"configs/glm-4.5-air.yaml": 106_852_245_504, "configs/glm-4.5.yaml": 352_797_814_784}
"""transformers' Glm4MoeForCausalLM parameter counts of the published configs, without the MTP layer (GLM-SPEC 7)."""


def _transformers_count(model: ModelConfig) -> int:
    """Parameters of transformers' Glm4MoeForCausalLM with this config's shapes, built on the meta device."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    hf = Glm4MoeConfig(vocab_size=model.vocab_size, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
                       intermediate_size=model.ffn_size, moe_intermediate_size=model.moe_ffn_size,
                       num_attention_heads=model.num_attention_heads, num_key_value_heads=model.num_kv_heads,
                       head_dim=model.head_dim, n_routed_experts=model.moe_num_experts,
                       n_shared_experts=model.moe_shared_experts, num_experts_per_tok=model.moe_top_k,
                       first_k_dense_replace=model.moe_first_dense_layers, use_qk_norm=model.qk_norm,
                       attention_bias=model.add_qkv_bias, partial_rotary_factor=model.rotary_fraction,
                       tie_word_embeddings=model.tie_word_embeddings, num_nextn_predict_layers=model.mtp_layers)
    with torch.device("meta"):
        return sum(p.numel() for p in Glm4MoeForCausalLM(hf).parameters())


@pytest.mark.parametrize("path, published", list(PUBLISHED.items()))
def test_totals_without_mtp_are_transformers_counts(path, published):
    model = load_config(path).model
    assert model.num_parameters(mtp=False) == published
    assert _transformers_count(model) == published
    assert re.search(rf"total without MTP\s+{published:,}\s", count_summary(model))


def _attention(h: int, q: int, kv: int, head_dim: int, qk_norm: bool) -> int:
    """One block's attention and its two RMSNorms, by hand: q/k/v weights and biases, the output [h, q]."""
    return (q + 2 * kv) * h + (q + 2 * kv) + q * h + 2 * h + (2 * head_dim if qk_norm else 0)


def test_glm_4_5_active_and_mtp_by_hand():
    model = load_config("configs/glm-4.5.yaml").model
    h, vocab, expert = 5120, 151552, 3 * 1536 * 5120
    attention = _attention(h, 12288, 1024, 128, qk_norm=True)
    dense = attention + 3 * 12288 * h
    moe_active = attention + 160 * h + (8 + 1) * expert  # router, the top-8 routed and the shared expert
    moe_total = attention + 160 * h + (160 + 1) * expert
    ends = 2 * vocab * h + h  # word embedding, untied output layer, final norm
    assert model.active_parameters(mtp=False) == ends + 3 * dense + 89 * moe_active == 33_632_251_904
    assert model.num_parameters(mtp=False) == ends + 3 * dense + 89 * moe_total
    # the MTP layer: enorm, hnorm, its final norm, eh_proj [h, 2h] and one MoE block (block 92); the head is shared
    mtp_total, mtp_active = 3 * h + 2 * h * h + moe_total, 3 * h + 2 * h * h + moe_active
    assert model.num_parameters() - model.num_parameters(mtp=False) == mtp_total
    assert model.active_parameters() - model.active_parameters(mtp=False) == mtp_active
    assert (model.num_moe_layers(), model.num_moe_layers(mtp=False)) == (90, 89)
    # the published "32B active" leaves out the embedding and the output layer
    assert round((model.active_parameters(mtp=False) - 2 * vocab * h) / 1e9) == 32


def test_glm_4_5_air_active_by_hand():
    model = load_config("configs/glm-4.5-air.yaml").model
    h, vocab, expert = 4096, 151552, 3 * 1408 * 4096
    attention = _attention(h, 12288, 1024, 128, qk_norm=False)
    active = 2 * vocab * h + h + attention + 3 * 10944 * h + 45 * (attention + 128 * h + (8 + 1) * expert)
    assert model.active_parameters(mtp=False) == active == 13_424_123_904
    assert round((active - 2 * vocab * h) / 1e9) == 12  # the published 12B active
    summary = count_summary(model)
    for row, count in (("total", model.num_parameters()), ("active per token", model.active_parameters()),
                       ("total without MTP", 106_852_245_504), ("active per token without MTP", active)):
        assert re.search(rf"  {re.escape(row)}\s+{count:,}\s", summary), summary


def test_a_dense_model_is_all_active():
    model = load_config("configs/glm-4-9b.yaml").model
    assert model.active_parameters() == model.num_parameters() == 9_399_951_360
    assert "without MTP" not in count_summary(model)


TINY_MOE = dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, kv_channels=32,
                vocab_size=300, position_embedding="rope_1d", rotary_fraction=0.5, normalization="rmsnorm",
                mlp="swiglu", ffn_hidden_size=96, add_bias_linear=False, tie_word_embeddings=False, qk_norm=True,
                moe_num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, moe_shared_experts=1,
                moe_first_dense_layers=1, mtp_layers=1)
"""Every GLM-4.5 count switch: a dense first block, routed + shared experts, QK-norm, MTP, heads x dim != width."""


def _implemented(config: ModelConfig) -> bool:
    try:
        config.validate()
    except ConfigError as error:
        if "not implemented yet" in str(error):
            return False
        raise
    return True


def test_a_built_moe_model_has_the_closed_form_count():
    config = ModelConfig(**TINY_MOE)
    if not _implemented(config):
        pytest.skip("the MoE / MTP / QK-norm model code is not on this branch (issue 25's moe and mtp-hf branches)")
    from trainer.model.summary import meta_model

    for tp in (1, 2):
        assert sum(p.numel() for p in meta_model(config, tp).parameters()) == config.num_parameters(tp)


def test_print_model_on_glm_4_5():
    """The big config prints from the closed form (and its meta-device count, which allocates nothing)."""
    if not _implemented(load_config("configs/glm-4.5.yaml").model):
        pytest.skip("the MoE / MTP / QK-norm model code is not on this branch (issue 25's moe and mtp-hf branches)")
    result = run_train(["--config", "configs/glm-4.5.yaml", "--print-model"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"total without MTP\s+352,797,814,784\s", result.stdout)
    assert re.search(r"active per token without MTP\s+33,632,251,904\s", result.stdout)


def test_flops_are_twice_the_active_matrices_plus_attention():
    """Forward FLOPs/token = 2 x (active weight-matrix parameters: the active ones less the word embedding's lookup,
    the norms and the biases) + 4 s q per block (scores and probabilities x values), MTP included."""
    s = 4096
    for path in PUBLISHED:
        model = load_config(path).model
        h, q, kv = model.hidden_size, *model.qkv_rows[:2]
        blocks = model.num_layers + model.mtp_layers
        norms = blocks * (2 * h + 2 * model.head_dim * model.qk_norm) + h + model.mtp_layers * 3 * h
        biases = blocks * (q + 2 * kv)
        matrices = model.active_parameters() - model.padded_vocab_size(1) * h - norms - biases
        head_again = model.mtp_layers * 2 * h * model.padded_vocab_size(1)  # the MTP layer reuses the output layer
        assert forward_flops_per_token(model, s) == 2 * matrices + head_again + blocks * 4 * s * q
        assert train_flops_per_token(model, s) == 3 * forward_flops_per_token(model, s)


def test_moe_flops_count_top_k_not_all_experts():
    model = load_config("configs/glm-4.5-air.yaml").model
    more = dataclasses.replace(model, moe_num_experts=256)  # more experts, the same k: only the router grows
    assert forward_flops_per_token(more, 4096) - forward_flops_per_token(model, 4096) == 2 * 4096 * 128 * 46
    wider = dataclasses.replace(model, moe_top_k=9)  # one more chosen expert per token in each of 46 MoE blocks
    assert forward_flops_per_token(wider, 4096) - forward_flops_per_token(model, 4096) == 2 * 3 * 1408 * 4096 * 46
