"""Attention: the FP32-softmax switch against plain fp32 softmax, the SDPA path against the formula,
grouped-query attention against multi-head attention with repeated key/value heads, and the KV cache
against full-sequence attention."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from deepspeed.accelerator import get_accelerator

from tests.test_model_mask import packed_segments
from trainer.model.attention import MASKED_SCORE, KVCache, SelfAttention, flex_glm_attention, fp32_softmax_attention
from trainer.model.config import ModelConfig
from trainer.model.mask import GLMMask, dense_mask, segments_of_sep
from trainer.model.rotary import position_rotations
from trainer.parallel.random import MODEL_PARALLEL_RNG, get_rng_tracker, model_parallel_seed
from trainer.parallel.topology import Topology


def compact_sep_mask(sep: torch.Tensor, s: int) -> GLMMask:
    """The compact mask of one sample per row."""
    return GLMMask(segments_of_sep(sep, s))


def dense_sep_mask(sep: torch.Tensor, s: int) -> torch.Tensor:
    """The dense [b, 1, s, s] mask of one sample per row, from the model's rule."""
    return dense_mask(segments_of_sep(sep, s))


def attend(attention: SelfAttention, hidden, position_ids, block_position_ids, mask, kv_cache=None):
    """attention as a block calls it: the RoPE tables of the ids, a GLMMask in the form of the module's kernel."""
    if isinstance(mask, GLMMask):
        mask = attention.kernel_mask(mask, hidden.dtype)
    rotations = position_rotations(position_ids, block_position_ids, attention.config)
    return attention(hidden, rotations, mask, kv_cache=kv_cache)


def glm_mask(sep: torch.Tensor, s: int) -> torch.Tensor:
    """[b, 1, s, s]: column j visible from row i iff j < sep or j <= i."""
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    return ((j < sep[:, None, None]) | (j <= i))[:, None]


def fp32_reference(q, k, v, mask):
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, MASKED_SCORE)
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_fp32_softmax_with_layer_scaling_equals_fp32_softmax(dtype, tol):
    torch.manual_seed(0)
    b, n, s, d = 2, 2, 8, 16
    # logits q.k / sqrt(d) of std 16; the tolerance is the rounding of such scores in the dtype
    q, k = torch.randn(b, n, s, d) * 4, torch.randn(b, n, s, d) * 4
    v = torch.randn(b, n, s, d)
    mask = glm_mask(torch.tensor([3, 5]), s)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    got = fp32_softmax_attention(q, k, v, mask, layer_number=24, dropout=lambda p: p)
    assert got.dtype == dtype
    assert_close(got.double(), fp32_reference(q, k, v, mask), atol=tol, rtol=tol)


def test_layer_scaling_keeps_fp16_scores_finite_where_unscaled_ones_overflow():
    torch.manual_seed(0)
    b, n, s, d = 1, 1, 6, 64
    k = torch.randn(b, n, s, d) * 40
    q = k + torch.randn(b, n, s, d)  # q_i . k_i ~ 40^2 * 64 > 65504, the fp16 maximum
    v = torch.randn(b, n, s, d)
    mask = glm_mask(torch.tensor([2]), s)
    q, k, v = q.half(), k.half(), v.half()
    assert torch.isinf(q @ k.transpose(-1, -2)).any()
    got = fp32_softmax_attention(q, k, v, mask, layer_number=70, dropout=lambda p: p)
    assert torch.isfinite(got).all()
    assert_close(got.double(), fp32_reference(q, k, v, mask), atol=2e-2, rtol=2e-2)


def _qkv_of(attention: SelfAttention, hidden: torch.Tensor):
    b, s, _ = hidden.shape
    q, k, v = attention.query_key_value(hidden).view(b, s, 3, attention.local_heads, -1).unbind(2)
    return (t.transpose(1, 2) for t in (q, k, v))  # [b, n, s, d]


@pytest.mark.parametrize("fp32_softmax", [False, True])
def test_attention_module_matches_the_formula(fp32_softmax):
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_attention_heads=4, attention_dropout=0.0,
                         fp32_softmax_layer_scaling=fp32_softmax)
    attention = SelfAttention(config, layer_number=3, seed=1)
    hidden = torch.randn(2, 7, 32)
    mask = glm_mask(torch.tensor([2, 4]), 7)
    ids = torch.zeros(2, 7, dtype=torch.long)
    q, k, v = _qkv_of(attention, hidden)
    context = fp32_reference(q, k, v, mask).float().transpose(1, 2).reshape(2, 7, 32)  # [b, s, h]
    assert_close(attend(attention, hidden, ids, ids, mask), attention.dense(context), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["grouped_query", "multi_query"])
def test_grouped_query_equals_multi_head_with_repeated_key_value_heads(kv_heads):
    """n = 4 query heads, g key/value heads: query head j uses key/value head j // (n / g)."""
    torch.manual_seed(0)
    switches = dict(hidden_size=32, num_attention_heads=4, attention_dropout=0.0, position_embedding="rope_1d",
                    rotary_fraction=0.5, rotary_pairing="interleaved", add_bias_linear=False)
    grouped = SelfAttention(ModelConfig(num_key_value_heads=kv_heads, **switches), layer_number=1, seed=2)
    multi_head = SelfAttention(ModelConfig(**switches), layer_number=1, seed=2)
    assert grouped.dense.bias is None
    d, repeat = 8, 4 // kv_heads
    with torch.no_grad():
        grouped.query_key_value.bias.normal_()
        for name in ("weight", "bias"):
            q, k, v = getattr(grouped.query_key_value, name).split([32, kv_heads * d, kv_heads * d])
            repeated = [t.unflatten(0, (kv_heads, d)).repeat_interleave(repeat, dim=0).flatten(0, 1) for t in (k, v)]
            getattr(multi_head.query_key_value, name).copy_(torch.cat([q, *repeated]))
        multi_head.dense.weight.copy_(grouped.dense.weight)
    hidden = torch.randn(2, 7, 32)
    positions = torch.arange(7).expand(2, 7)
    mask = glm_mask(torch.tensor([2, 4]), 7)
    assert_close(attend(grouped, hidden, positions, positions * 0, mask),
                 attend(multi_head, hidden, positions, positions * 0, mask), atol=1e-6, rtol=1e-6)


def test_tp_splits_key_value_heads_it_divides_and_replicates_those_it_is_a_multiple_of():
    from trainer.errors import ConfigError

    config = ModelConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2)  # head dim 8
    for tp, replicated in ((1, False), (2, False), (4, True), (8, True)):
        config.validate(tp)
        assert config.replicates_kv_heads(tp) == replicated
    with pytest.raises(ConfigError, match=r"num_key_value_heads=2 and parallel.tp=3: tp must divide the key/value"):
        ModelConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2).validate(3)
    with pytest.raises(ConfigError, match=r"parallel.tp=4 replicates the 1 key/value head\(s\), whose 2 weight rows"):
        ModelConfig(hidden_size=8, num_attention_heads=4, num_key_value_heads=1).validate(4)


def _replicated_kv_cache(rank: int, world_size: int) -> None:
    """Multi-query attention at tp=2 with a KV cache equals the tp=1 module over the whole sequence."""
    from trainer.parallel.topology import Topology

    config = ModelConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, attention_dropout=0.0,
                         position_embedding="rope_1d", rotary_fraction=0.5, rotary_pairing="interleaved")
    whole = SelfAttention(config, layer_number=1, seed=2).eval()
    sharded = SelfAttention(config, layer_number=1, tp_group=Topology.create(tp=2, pp=1).tp_group, seed=2).eval()
    assert sharded.query_key_value.replicated_kv and sharded.local_kv_heads == 1
    with torch.no_grad():  # the biases start at zero: give them values for the gather to carry
        whole.query_key_value.bias.normal_(generator=torch.Generator().manual_seed(0))
        q, k, v = whole.query_key_value.bias.split(config.qkv_rows)
        sharded.query_key_value.bias.copy_(torch.cat([q.chunk(2)[rank], k.chunk(2)[rank], v.chunk(2)[rank]]))
    s, first = 9, 5
    hidden = torch.randn(1, s, 32, generator=torch.Generator().manual_seed(1))
    positions, blocks = torch.zeros(1, s, dtype=torch.long), torch.arange(s)[None]
    mask = glm_mask(torch.tensor([1]), s)
    cache = KVCache()
    head = attend(sharded, hidden[:, :first], positions[:, :first], blocks[:, :first], mask[:, :, :first, :first],
                  cache)
    tail = attend(sharded, hidden[:, first:], positions[:, first:], blocks[:, first:], mask[:, :, first:, :], cache)
    assert cache.key.shape == (1, 1, s, 8)  # the one key/value head, on both ranks
    assert_close(torch.cat([head, tail], dim=1), attend(whole, hidden, positions, blocks, mask), atol=1e-5, rtol=1e-5)


def test_replicated_key_value_head_with_a_kv_cache_at_tp2_equals_tp1():
    from tests.distributed import run_distributed

    run_distributed(_replicated_kv_cache, 2)


@pytest.mark.parametrize("position_embedding, kv_heads", [("rope_1d", None), ("rope_2d", None), ("rope_1d", 1)])
def test_kv_cache_equals_full_sequence(position_embedding, kv_heads):
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_attention_heads=2, attention_dropout=0.0,
                         position_embedding=position_embedding, num_key_value_heads=kv_heads)
    attention = SelfAttention(config, layer_number=1, seed=2).eval()
    s, sep, first = 9, 4, 6
    hidden = torch.randn(1, s, 32)
    position_ids = torch.tensor([[0, 1, 2, 3, 3, 3, 3, 3, 3]])
    block_position_ids = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    mask = glm_mask(torch.tensor([sep]), s)
    full = attend(attention, hidden, position_ids, block_position_ids, mask)
    cache = KVCache()
    head = attend(attention, hidden[:, :first], position_ids[:, :first], block_position_ids[:, :first],
                     mask[:, :, :first, :first], kv_cache=cache)
    tail = attend(attention, hidden[:, first:], position_ids[:, first:], block_position_ids[:, first:],
                     mask[:, :, first:, :], kv_cache=cache)
    assert_close(torch.cat([head, tail], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fp32_softmax", [False, True])
def test_attention_dropout_draws_from_the_tensor_parallel_stream(fp32_softmax):
    model_parallel_seed(5, Topology.single())
    config = ModelConfig(hidden_size=32, num_attention_heads=4, attention_dropout=0.5,
                         fp32_softmax_layer_scaling=fp32_softmax)
    attention = SelfAttention(config, layer_number=1, seed=0)
    hidden, mask = torch.randn(1, 6, 32), glm_mask(torch.tensor([2]), 6)
    ids = torch.zeros(1, 6, dtype=torch.long)
    default_before = torch.get_rng_state()
    fork_before = get_rng_tracker().get_states()[MODEL_PARALLEL_RNG]
    dropped = attend(attention, hidden, ids, ids, mask)
    assert torch.equal(torch.get_rng_state(), default_before)  # the default stream did not move
    assert not torch.equal(get_rng_tracker().get_states()[MODEL_PARALLEL_RNG], fork_before)
    assert (dropped - attend(attention.eval(), hidden, ids, ids, mask)).abs().max() > 1e-3


def test_glm_mask_is_the_formula_and_is_shared_while_segments_are_the_same_tensor():
    sep = torch.tensor([3, 130, 200])
    segments = segments_of_sep(sep, 200)
    mask = GLMMask.of(segments)
    assert torch.equal(mask.dense(), glm_mask(sep, 200))
    assert GLMMask.of(segments) is mask  # the next block of the stage reuses it
    assert GLMMask.of(segments.clone()) is not mask  # a new micro-batch's segments
    segments[0, 1] = 5  # changed in place: rebuilt
    changed = GLMMask.of(segments)
    assert changed is not mask and torch.equal(changed.dense(), glm_mask(torch.tensor([5, 130, 200]), 200))
    additive = changed.additive(torch.bfloat16)
    assert additive.dtype == torch.bfloat16 and changed.additive(torch.bfloat16) is additive
    assert torch.equal(additive == 0, changed.dense()) and torch.isinf(additive[~changed.dense()]).all()


def test_attention_with_compact_mask_equals_dense_mask_outputs_and_grads():
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_attention_heads=4, attention_dropout=0.0, position_embedding="rope_1d")
    attention = SelfAttention(config, layer_number=2, seed=1)
    sep, s = torch.tensor([2, 5]), 9
    hidden = torch.randn(2, s, 32, requires_grad=True)
    ids = torch.arange(s).expand(2, s)
    results = []
    for mask in (dense_sep_mask(sep, s), compact_sep_mask(sep, s)):
        out = attend(attention, hidden, ids, ids, mask)
        grads = torch.autograd.grad(out.square().sum(), [hidden, *attention.parameters()])
        results.append((out, grads))
    assert_close(results[1], results[0])


@pytest.mark.parametrize("fp32_softmax", [False, True])
def test_attention_with_compact_mask_equals_dense_mask_for_both_softmax_paths(fp32_softmax):
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_attention_heads=4, attention_dropout=0.0,
                         fp32_softmax_layer_scaling=fp32_softmax)
    attention = SelfAttention(config, layer_number=3, seed=1)
    sep, s = torch.tensor([1, 6]), 8
    hidden, ids = torch.randn(2, s, 32), torch.zeros(2, s, dtype=torch.long)
    dense = dense_sep_mask(sep, s)
    assert_close(attend(attention, hidden, ids, ids, compact_sep_mask(sep, s)),
                 attend(attention, hidden, ids, ids, dense))


@pytest.mark.parametrize("s", [200, 256])
def test_flex_attention_equals_sdpa_with_the_dense_mask(s):
    """FlexAttention's block-sparse GLM mask (eager reference kernel on CPU, forward) against SDPA:
    seps inside a tile, on a tile boundary, past the diagonal tiles."""
    torch.manual_seed(0)
    b, n, d = 4, 2, 16
    q, k, v = (torch.randn(b, n, s, d) for _ in range(3))
    mask = compact_sep_mask(torch.tensor([1, 37, 128, s - 3]), s)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())
    assert_close(flex_glm_attention(q, k, v, mask.block_mask()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(get_accelerator().device_name() == "cpu",
                    reason="FlexAttention has no backward on CPU; the kernel trains on accelerators only")
@pytest.mark.parametrize("rows", [[[(384, 40)], [(384, 300)]],
                                  [[(100, 40), (200, 30), (60, 60)], [(130, 129), (128, 3), (5, 2)]]],
                         ids=["one_sample_per_row", "packed"])
def test_flex_attention_path_equals_sdpa_path_outputs_and_grads_on_the_accelerator(rows):
    torch.manual_seed(0)
    device = get_accelerator().device_name(0)
    config = ModelConfig(hidden_size=128, num_attention_heads=4, attention_dropout=0.0)
    attention = SelfAttention(config, layer_number=1, seed=3).to(device)
    s = 384
    segments = packed_segments(rows, s).to(device)
    hidden = torch.randn(2, s, 128, device=device, requires_grad=True)
    ids = torch.zeros(2, s, dtype=torch.long, device=device)
    results = []
    for mask in (dense_mask(segments), GLMMask(segments)):  # SDPA, then FlexAttention
        out = attend(attention, hidden, ids, ids, mask)
        results.append((out, torch.autograd.grad(out.square().sum(), [hidden, *attention.parameters()])))
    assert_close(results[1], results[0], atol=2e-4, rtol=2e-4)


def _grouped_qkv(b, n, g, s, d, dtype=torch.float32, scale=1.0):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(b, n, s, d, generator=generator) * scale
    k = torch.randn(b, g, s, d, generator=generator) * scale
    return q.to(dtype), k.to(dtype), torch.randn(b, g, s, d, generator=generator).to(dtype)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["multi_head", "grouped_query"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_fp32_softmax_with_layer_scaling_equals_the_eager_formula(kv_heads, dtype):
    """The FlexAttention form (q / (sqrt(d) c), score_mod * c on the kernel's fp32 scores) against the eager
    fp32_softmax_attention, on packed rows, forward (CPU: FlexAttention's eager reference kernel). fp32: equal.
    bf16: the eager formula rounds the scores to bf16 before the fp32 softmax, the kernel does not, so each is
    compared with the float64 softmax: the kernel's error is no larger than the formula's."""
    b, n, s, d = 2, 4, 256, 16
    q, k, v = _grouped_qkv(b, n, kv_heads, s, d, dtype, scale=2.0)
    mask = GLMMask(packed_segments([[(100, 40), (150, 30)], [(129, 128), (127, 3)]], s))
    c = 24
    got = flex_glm_attention(q, k, v, mask.block_mask(), layer_scaling=torch.tensor(float(c)))
    eager = fp32_softmax_attention(q, k, v, mask.dense(), layer_number=c, dropout=lambda p: p)
    assert got.dtype == eager.dtype == dtype
    if dtype == torch.float32:
        assert_close(got, eager, atol=1e-5, rtol=1e-5)
        return
    reference = fp32_reference(q, *(t.repeat_interleave(n // kv_heads, dim=1) for t in (k, v)), mask.dense())
    got_error, eager_error = ((t.double() - reference).abs().max().item() for t in (got, eager))
    assert got_error <= eager_error and got_error < 0.05, (got_error, eager_error)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["grouped_query", "multi_query"])
def test_kernels_take_grouped_key_value_heads_as_the_repeated_heads(kv_heads):
    """SDPA's and FlexAttention's enable_gqa, and the eager formula's grouped view, against K and V repeated per
    query head (repeat_interleave: query head j uses key/value head j // (n / g))."""
    b, n, s, d = 2, 4, 200, 8
    q, k, v = _grouped_qkv(b, n, kv_heads, s, d)
    mask = compact_sep_mask(torch.tensor([37, 150]), s)
    k_rep, v_rep = (t.repeat_interleave(n // kv_heads, dim=1) for t in (k, v))
    expected = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask.dense())
    assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q.dtype), enable_gqa=True), expected)
    assert_close(flex_glm_attention(q, k, v, mask.block_mask()), expected, atol=1e-5, rtol=1e-5)
    grouped = fp32_softmax_attention(q, k, v, mask.dense(), layer_number=3, dropout=lambda p: p)
    repeated = fp32_softmax_attention(q, k_rep, v_rep, mask.dense(), layer_number=3, dropout=lambda p: p)
    assert_close(grouped, repeated)


def test_rope_tables_are_built_once_per_micro_batch(monkeypatch):
    from trainer.model import rotary
    from trainer.model.glm import GLMModel

    built = []
    original = rotary.position_rotations
    monkeypatch.setattr(rotary, "position_rotations", lambda *args: built.append(1) or original(*args))
    config = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=64, hidden_dropout=0.0,
                         attention_dropout=0.0, position_embedding="rope_1d")
    model = GLMModel(config)
    ids, s = torch.zeros(2, 8, dtype=torch.long), 8
    positions = torch.arange(s).expand(2, s)
    inputs = (ids, positions, positions * 0, segments_of_sep(torch.tensor([3, 5]), s))
    model(*inputs)
    assert len(built) == 1  # three blocks, queries and keys: one table
    model(*inputs[:3], inputs[3].clone())  # a new micro-batch's mask; the same id tensors keep their tables
    assert len(built) == 1
    model(ids, positions.clone(), positions * 0, inputs[3])  # new ids: new tables
    assert len(built) == 2


@pytest.mark.skipif(get_accelerator().device_name() == "cpu",
                    reason="FlexAttention has no backward on CPU; the kernel trains on accelerators only")
def test_flex_fp32_softmax_path_equals_the_eager_formula_outputs_and_grads_on_the_accelerator():
    torch.manual_seed(0)
    device = get_accelerator().device_name(0)
    config = ModelConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
                         fp32_softmax_layer_scaling=True, position_embedding="rope_1d")
    attention = SelfAttention(config, layer_number=5, seed=3).to(device)
    s = 384
    segments = packed_segments([[(100, 40), (200, 30), (60, 60)], [(130, 129), (128, 3), (5, 2)]], s).to(device)
    hidden = torch.randn(2, s, 128, device=device, requires_grad=True)
    ids = torch.arange(s, device=device).expand(2, s)
    results = []
    for mask in (dense_mask(segments), GLMMask(segments)):  # the eager formula, then FlexAttention
        out = attend(attention, hidden, ids, ids * 0, mask)
        results.append((out, torch.autograd.grad(out.square().sum(), [hidden, *attention.parameters()])))
    assert_close(results[1], results[0], atol=2e-4, rtol=2e-4)
