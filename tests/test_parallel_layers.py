"""Tensor-parallel layers on 2 gloo ranks against nn.Linear / nn.Embedding holding the same full weights:
outputs and every gradient equal; the same init_method gives the same full matrix on tp=1 and tp=2."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.distributed import run_distributed
from trainer.errors import ConfigError
from trainer.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

IN, OUT, VOCAB = 6, 8, 10
SHAPE = (2, 3)  # [b, s]


def seeded_normal(seed: int):
    """An init_method: N(0, 1) on the full weight from its own generator."""
    def init(weight: torch.Tensor) -> None:
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))
    return init


def _data(*shapes: tuple) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def _reference_linear(bias: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(IN, OUT)
    with torch.no_grad():
        seeded_normal(7)(linear.weight)
        linear.bias.copy_(bias)
    return linear


def _check_column(rank: int, group, gather_output: bool) -> None:
    x, w, bias = _data((*SHAPE, IN), (*SHAPE, OUT), (OUT,))
    reference = _reference_linear(bias)
    x_ref = x.clone().requires_grad_()
    (reference(x_ref) * w).sum().backward()

    layer = ColumnParallelLinear(IN, OUT, group=group, gather_output=gather_output, init_method=seeded_normal(7))
    with torch.no_grad():
        layer.bias.copy_(bias.chunk(2)[rank])
    x_tp = x.clone().requires_grad_()
    y = layer(x_tp)
    expected = reference(x) if gather_output else reference(x)[..., OUT // 2 * rank:OUT // 2 * (rank + 1)]
    torch.testing.assert_close(y, expected)
    (y * (w if gather_output else w.chunk(2, dim=-1)[rank])).sum().backward()
    torch.testing.assert_close(x_tp.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad.chunk(2, dim=0)[rank])
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad.chunk(2)[rank])
    assert layer.weight.tensor_model_parallel and layer.bias.tensor_model_parallel


def _check_row(rank: int, group, input_is_parallel: bool) -> None:
    x, w, bias = _data((*SHAPE, IN), (*SHAPE, OUT), (OUT,))
    reference = _reference_linear(bias)
    x_ref = x.clone().requires_grad_()
    (reference(x_ref) * w).sum().backward()

    layer = RowParallelLinear(IN, OUT, group=group, input_is_parallel=input_is_parallel,
                              init_method=seeded_normal(7))
    with torch.no_grad():
        layer.bias.copy_(bias)
    x_tp = (x.chunk(2, dim=-1)[rank] if input_is_parallel else x).clone().requires_grad_()
    y = layer(x_tp)
    torch.testing.assert_close(y, reference(x))
    (y * w).sum().backward()
    expected_x_grad = x_ref.grad.chunk(2, dim=-1)[rank] if input_is_parallel else x_ref.grad
    torch.testing.assert_close(x_tp.grad, expected_x_grad)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad.chunk(2, dim=1)[rank])
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
    assert layer.weight.tensor_model_parallel and not getattr(layer.bias, "tensor_model_parallel", False)


def _check_embedding(rank: int, group) -> None:
    input_ids = torch.tensor([[0, 4, 5, 9], [9, 3, 5, 0]])
    (w,) = _data((*input_ids.shape, 4))
    reference = nn.Embedding(VOCAB, 4)
    seeded_normal(3)(reference.weight.data)
    (reference(input_ids) * w).sum().backward()

    layer = VocabParallelEmbedding(VOCAB, 4, group=group, init_method=seeded_normal(3))
    assert (layer.vocab_start, layer.vocab_end) == (5 * rank, 5 * (rank + 1))
    y = layer(input_ids)
    torch.testing.assert_close(y, F.embedding(input_ids, reference.weight))
    (y * w).sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad.chunk(2, dim=0)[rank])


def _gathered(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(2)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _check_init_parity(group) -> None:
    builders = [(lambda g, init: ColumnParallelLinear(IN, OUT, group=g, init_method=init), 0),
                (lambda g, init: RowParallelLinear(IN, OUT, group=g, init_method=init), 1),
                (lambda g, init: VocabParallelEmbedding(VOCAB, 4, group=g, init_method=init), 0)]
    for build, dim in builders:
        full = build(None, seeded_normal(11)).weight.data
        torch.testing.assert_close(_gathered(build(group, seeded_normal(11)).weight.data, dim, group), full)
        torch.manual_seed(5)  # the default init draws from the default generator, seeded alike on every rank
        full = build(None, None).weight.data
        torch.manual_seed(5)
        torch.testing.assert_close(_gathered(build(group, None).weight.data, dim, group), full)


def _all_layers(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=list(range(world_size)))
    for gather_output in (False, True):
        _check_column(rank, group, gather_output)
    for input_is_parallel in (True, False):
        _check_row(rank, group, input_is_parallel)
    _check_embedding(rank, group)
    _check_init_parity(group)


def test_layers_match_single_process_reference_on_two_ranks():
    run_distributed(_all_layers, 2)


def test_single_process_layers_are_plain_layers():
    (x,) = _data((*SHAPE, IN))
    layer = ColumnParallelLinear(IN, OUT, group=None, init_method=seeded_normal(7))
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))  # biases start at zero
    assert layer.weight.shape == (OUT, IN) and not layer.weight.tensor_model_parallel
    row = RowParallelLinear(IN, OUT, group=None, bias=False, init_method=seeded_normal(7))
    torch.testing.assert_close(row(x), F.linear(x, layer.weight))
    assert row.bias is None


def test_meta_device_builds_shapes_without_values():
    with torch.device("meta"):
        layer = ColumnParallelLinear(IN, OUT, group=None, init_method=seeded_normal(7))
    assert layer.weight.is_meta and layer.weight.shape == (OUT, IN)


def _indivisible(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=list(range(world_size)))
    with pytest.raises(ConfigError, match="out_features=7 is not divisible by the tensor-parallel size 2"):
        ColumnParallelLinear(IN, 7, group=group)


def test_indivisible_width_is_a_config_error():
    run_distributed(_indivisible, 2)
