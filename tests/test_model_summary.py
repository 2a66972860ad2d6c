"""Parameter counts: a meta-device model counted against the closed form, and GLM-130B's size."""
import re

import pytest

from trainer.config import load_config
from trainer.model.config import ModelConfig
from trainer.model.summary import meta_model, parameter_summary

CONFIGS = ["configs/glm-base.yaml", "configs/glm-large.yaml", "configs/glm-10b.yaml", "configs/glm-130b.yaml",
           "configs/chatglm-6b.yaml", "configs/chatglm3-6b.yaml", "configs/glm-4-9b.yaml"]
PUBLISHED = {"configs/chatglm-6b.yaml": 6_173_286_400, "configs/chatglm3-6b.yaml": 6_243_584_000,
             "configs/glm-4-9b.yaml": 9_399_951_360}
"""The parameter counts of the published checkpoints (GLM-SPEC section 6)."""


def _counted(config: ModelConfig, tp: int) -> int:
    return sum(p.numel() for p in meta_model(config, tp).parameters())


@pytest.mark.parametrize("path", CONFIGS)
def test_counted_equals_closed_form(path):
    config = load_config(path)
    for tp in sorted({1, config.parallel.tp}):
        closed = config.model.num_parameters(tp)
        assert _counted(config.model, tp) == closed
        summary = parameter_summary(config.model, tp=tp)
        for row in ("total (counted)", "total (closed form)"):
            assert re.search(rf"{re.escape(row)}\s+{closed:,}\s", summary), summary
        assert "counted == closed form" in summary


@pytest.mark.parametrize("path, published", list(PUBLISHED.items()))
def test_later_generations_have_their_published_sizes(path, published):
    config = load_config(path)
    assert config.model.num_parameters(config.parallel.tp) == published
    assert re.search(rf"total \(counted\)\s+{published:,}\s", parameter_summary(config.model, config.parallel.tp))


@pytest.mark.parametrize("switches", [{}, {"position_embedding": "rope_2d", "norm": "deepnorm", "mlp": "geglu"},
                                      {"num_key_value_heads": 1, "normalization": "rmsnorm", "mlp": "swiglu",
                                       "add_bias_linear": False, "add_qkv_bias": False, "tie_word_embeddings": False}])
def test_small_models_counted_equals_closed_form(switches):
    config = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, vocab_size=1000, **switches)
    for tp in (1, 2, 4):
        assert _counted(config, tp) == config.num_parameters(tp)


def test_glm_130b_has_130_billion_parameters():
    config = load_config("configs/glm-130b.yaml")
    print(parameter_summary(config.model, tp=config.parallel.tp))
    counted = _counted(config.model, config.parallel.tp)
    # The published shape, the output layer tied to the word embedding, has 128.70B parameters, which the
    # paper rounds to 130B: 1.0017% below the name, so the bound is 1% plus that rounding.
    assert counted == 128_697_794_560
    assert abs(counted - 130e9) / 130e9 < 0.011


def test_a_mixture_of_experts_prints_its_active_parameters():
    """glm-4.5-debug: 3 MoE blocks of 8 experts, top-2, each expert a SwiGLU of 32 at width 64 (3 * 32 * 64
    parameters): a token skips 6 experts in each of the 3 blocks."""
    import dataclasses

    from trainer.model.summary import active_parameters

    config = dataclasses.replace(load_config("configs/glm-4.5-debug.yaml").model, vocab_size=1000,
                                 mtp_layers=0)
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    active = total - 3 * 6 * (3 * 32 * 64)
    assert active_parameters(model) == active
    summary = parameter_summary(config)
    assert re.search(rf"active per token \(counted\)\s+{active:,}\s", summary), summary
    assert re.search(rf"total \(counted\)\s+{total:,}\s", summary) and "3 MoE layers of 8 experts" in summary
