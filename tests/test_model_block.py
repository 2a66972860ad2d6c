"""The block: pre-LN (LayerNorm and RMSNorm), DeepNorm and ChatGLM-6B's residual formulas with the block's own
sublayers, and the DeepNorm init gains."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.model.block import GLMBlock
from trainer.model.config import ModelConfig
from trainer.parallel.split import split_rank_major
from trainer.model.mask import segments_of_sep
from trainer.model.rotary import position_rotations


def glm_mask(sep: torch.Tensor, s: int) -> torch.Tensor:
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    return ((j < sep[:, None, None]) | (j <= i))[:, None]


def _run(norm, **switches):
    torch.manual_seed(0)
    config = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, norm=norm,
                         hidden_dropout=0.0, attention_dropout=0.0, **switches)
    block = GLMBlock(config, layer_number=2, seed=1)
    with torch.no_grad():  # non-trivial LayerNorm affines, so that a misplaced LayerNorm shows
        for norm_layer in (block.input_layernorm, block.post_attention_layernorm):
            norm_layer.weight.uniform_(0.5, 1.5)
            if norm_layer.bias is not None:
                norm_layer.bias.normal_()
    hidden = torch.randn(2, 6, 32)
    positions = torch.arange(6).repeat(2, 1)
    sep = torch.tensor([3, 4])
    out = block((hidden, positions, positions * 0, segments_of_sep(sep, 6)))
    rotations = position_rotations(positions, positions * 0, config)
    attend = lambda x: block.attention(x, rotations, glm_mask(sep, 6))
    return config, block, hidden, out, attend


def test_pre_ln_block_formula():
    _, block, x, out, attend = _run("pre_ln")
    x = x + attend(block.input_layernorm(x))
    x = x + block.mlp(block.post_attention_layernorm(x))
    assert_close(out[0], x, atol=1e-5, rtol=1e-5)


def test_pre_rmsnorm_block_formula():
    """ChatGLM2/3 and GLM-4: x = x + Attn(RMS_in(x)); x = x + MLP(RMS_post(x)), RMS(x) = x / rms(x) * g."""
    config, block, x, out, attend = _run("pre_ln", normalization="rmsnorm", mlp="swiglu", add_bias_linear=False)
    def rms(v, norm_layer):
        return v * torch.rsqrt(v.square().mean(-1, keepdim=True) + config.layernorm_epsilon) * norm_layer.weight

    x = x + attend(rms(x, block.input_layernorm))
    x = x + block.mlp(rms(x, block.post_attention_layernorm))
    assert_close(out[0], x, atol=1e-5, rtol=1e-5)


def test_chatglm_6b_residual_is_the_deepnorm_switch():
    """ChatGLM-6B's blocks: per sublayer x <- alpha LN(x) + f(LN(x)), alpha = (2N)^1/2, with 2D rotary."""
    config, block, x, out, attend = _run("deepnorm", position_embedding="rope_2d")
    alpha = math.sqrt(2 * 3)
    a = block.input_layernorm(x)
    x = alpha * a + attend(a)
    m = block.post_attention_layernorm(x)
    assert_close(out[0], alpha * m + block.mlp(m), atol=1e-5, rtol=1e-5)


def test_deepnorm_block_formula():
    """Each sublayer maps x to LN(alpha x + f(x)); GLM-130B keeps the closing LayerNorm of the MLP sublayer
    as the next block's input_layernorm, so a block returns alpha m + MLP(m) and starts with LN_in."""
    config, block, x, out, attend = _run("deepnorm")
    alpha = math.sqrt(2 * 3)
    a = block.input_layernorm(x)
    m = F.layer_norm(alpha * a + attend(a), (32,), block.post_attention_layernorm.weight,
                     block.post_attention_layernorm.bias, eps=config.layernorm_epsilon)
    assert_close(out[0], alpha * m + block.mlp(m), atol=1e-5, rtol=1e-5)
    assert abs(config.deepnorm_alpha - alpha) < 1e-12


@pytest.mark.parametrize("mlp_kind", ["gelu", "geglu"])
def test_deepnorm_init_gains(mlp_kind):
    n, h = 6, 256
    config = ModelConfig(num_layers=n, hidden_size=h, num_attention_heads=4, norm="deepnorm", mlp=mlp_kind)
    block = GLMBlock(config, layer_number=1, seed=0)
    beta, f = (2 * n) ** -0.5, config.ffn_size
    f_in = 2 * f if mlp_kind == "geglu" else f
    xavier = lambda gain, fan_in, fan_out: gain * math.sqrt(2 / (fan_in + fan_out))
    q, k, v = split_rank_major(block.attention.query_key_value.weight, config.qkv_rows, tp=1)
    expected = [(q, xavier(1, h, h)), (k, xavier(1, h, h)), (v, xavier(beta, h, h)),
                (block.attention.dense.weight, xavier(beta, h, h)),
                (block.mlp.dense_h_to_4h.weight, xavier(beta, h, f_in)),
                (block.mlp.dense_4h_to_h.weight, xavier(beta, f, h))]
    for weight, std in expected:
        assert abs(weight.std().item() / std - 1) < 0.03, (weight.shape, weight.std().item(), std)
        assert abs(weight.mean().item()) < 0.03 * std
    assert abs(config.deepnorm_beta - beta) < 1e-12
