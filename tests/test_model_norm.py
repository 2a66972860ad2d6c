"""The normalisation: LayerNorm equals torch's, RMSNorm equals its formula, parameter names and counts."""
import torch
from torch.testing import assert_close

from trainer.model.config import ModelConfig
from trainer.model.norm import Norm


def test_rmsnorm_is_x_over_rms_times_gain():
    torch.manual_seed(0)
    norm = Norm(ModelConfig(hidden_size=16, normalization="rmsnorm", layernorm_epsilon=1e-6))
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 16) * 5 + 1
    x64 = x.double()
    want = x64 / torch.sqrt((x64 ** 2).mean(dim=-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert_close(norm(x).double(), want, atol=1e-6, rtol=1e-6)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]


def test_rmsnorm_statistics_in_fp32_for_half_inputs():
    norm = Norm(ModelConfig(hidden_size=8, normalization="rmsnorm"))
    x = torch.full((1, 8), 300.0, dtype=torch.float16)  # x^2 = 9e4 overflows fp16
    assert_close(norm(x).float(), torch.ones(1, 8), atol=1e-3, rtol=1e-3)


def test_layernorm_equals_torch_layernorm():
    torch.manual_seed(0)
    norm = Norm(ModelConfig(hidden_size=16, layernorm_epsilon=1e-5))
    reference = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        for ours, theirs in ((norm.weight, reference.weight), (norm.bias, reference.bias)):
            ours.normal_()
            theirs.copy_(ours)
    x = torch.randn(2, 3, 16)
    assert_close(norm(x), reference(x))
    assert [name for name, _ in norm.named_parameters()] == ["weight", "bias"]
