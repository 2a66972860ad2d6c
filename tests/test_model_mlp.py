"""The MLP: tanh GeLU, GeGLU = a * gelu(b) and SwiGLU = silu(gate) * up on the two halves of the first
projection, the bias switch, init stds."""
import math

import pytest
import torch
from torch.testing import assert_close

from trainer.model.config import ModelConfig
from trainer.model.mlp import GLMMLP, gelu


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-6, 6, 101)
    want = 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))
    assert_close(gelu(x), want)


def test_geglu_is_a_times_gelu_b():
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=16, mlp="geglu", ffn_hidden_size=24)
    mlp = GLMMLP(config, layer_number=1, seed=3)
    with torch.no_grad():
        mlp.dense_h_to_4h.bias.normal_()
        mlp.dense_4h_to_h.bias.normal_()
    x = torch.randn(2, 5, 16)
    w, bias = mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias  # [2f, h]: a's rows, then b's rows (tp = 1)
    a = x @ w[:24].T + bias[:24]
    b = x @ w[24:].T + bias[24:]
    gelu_b = 0.5 * b * (1 + torch.tanh(math.sqrt(2 / math.pi) * (b + 0.044715 * b ** 3)))
    want = (a * gelu_b) @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
    assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)


def test_swiglu_is_silu_gate_times_up_without_biases():
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=16, mlp="swiglu", ffn_hidden_size=24, add_bias_linear=False)
    mlp = GLMMLP(config, layer_number=1, seed=3)
    assert mlp.dense_h_to_4h.bias is None and mlp.dense_4h_to_h.bias is None
    x = torch.randn(2, 5, 16)
    w = mlp.dense_h_to_4h.weight  # [2f, h]: the gate's rows, then up's rows (tp = 1)
    gate, up = x @ w[:24].T, x @ w[24:].T
    want = (gate / (1 + torch.exp(-gate)) * up) @ mlp.dense_4h_to_h.weight.T
    assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mlp_kind", ["gelu", "geglu", "swiglu"])
def test_pre_ln_init_stds(mlp_kind):
    config = ModelConfig(num_layers=8, hidden_size=256, mlp=mlp_kind, init_std=0.02)
    mlp = GLMMLP(config, layer_number=2, seed=0)
    assert abs(mlp.dense_h_to_4h.weight.std().item() / 0.02 - 1) < 0.02
    assert abs(mlp.dense_4h_to_h.weight.std().item() / (0.02 / math.sqrt(16)) - 1) < 0.02
    assert not mlp.dense_h_to_4h.bias.any() and not mlp.dense_4h_to_h.bias.any()
