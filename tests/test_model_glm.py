"""The whole model: blank-infilling attention end to end, and tp=2 against tp=1 (loss and every gradient)."""
import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from tests.distributed import run_distributed
from trainer.model.config import ModelConfig
from trainer.model.glm import GLMLoss, GLMModel
from trainer.parallel.split import split_rank_major
from trainer.model.mask import segments_of_sep
from trainer.model.output import OutputLayer, vocab_parallel_logits
from trainer.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from trainer.parallel.topology import Topology

SWITCH_SETS = {
    "glm": dict(position_embedding="learned_2d", norm="pre_ln", mlp="gelu"),
    "glm130b_rope1d": dict(position_embedding="rope_1d", norm="deepnorm", mlp="geglu", embedding_shrink_alpha=0.1,
                           fp32_softmax_layer_scaling=True),
    "glm130b_rope2d": dict(position_embedding="rope_2d", norm="deepnorm", mlp="geglu", embedding_shrink_alpha=0.1,
                           fp32_softmax_layer_scaling=True),
    "glm4": dict(position_embedding="rope_1d", rotary_fraction=0.5, rotary_pairing="interleaved",
                 normalization="rmsnorm", mlp="swiglu", num_key_value_heads=2, add_bias_linear=False,
                 tie_word_embeddings=False),
    "glm4_mqa": dict(position_embedding="rope_1d", rotary_fraction=0.5, rotary_pairing="interleaved",
                     normalization="rmsnorm", mlp="swiglu", num_key_value_heads=1, add_bias_linear=False,
                     tie_word_embeddings=False),  # at tp=2 the one key/value head is replicated
    "glm45_heads": dict(position_embedding="rope_1d", rotary_fraction=0.5, normalization="rmsnorm", mlp="swiglu",
                        num_key_value_heads=2, kv_channels=16, add_bias_linear=False,
                        tie_word_embeddings=False),  # GLM-4.5's shape: heads x head dim (4 x 16) wider than h 32
}


def tiny_config(**switches) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, max_sequence_length=16,
                       hidden_dropout=0.0, attention_dropout=0.0, **switches)


def glm_batch(b: int = 2, s: int = 12, vocab: int = 100):
    """A blank-infilling-shaped batch: Part A of length sep, then one Part B span at the blank's position."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (b, s), generator=generator)
    labels = torch.randint(0, vocab, (b, s), generator=generator)
    sep = torch.tensor([5, 7])[:b]
    index = torch.arange(s).repeat(b, 1)
    part_b = index >= sep[:, None]
    blank = torch.tensor([2, 6])[:b, None]
    position_ids = torch.where(part_b, blank, index)
    block_position_ids = torch.where(part_b, index - sep[:, None] + 1, 0)
    return (input_ids, position_ids, block_position_ids, segments_of_sep(sep, s)), (labels, part_b.long())


@pytest.mark.parametrize("switches", list(SWITCH_SETS.values()), ids=list(SWITCH_SETS))
def test_attention_is_blank_infilling(switches):
    """Changing the Part B token at position t changes no Part A output and no Part B output before t."""
    torch.manual_seed(0)
    model = GLMModel(tiny_config(**switches), seed=3)
    (input_ids, *rest), _ = glm_batch()
    before = model(input_ids, *rest)
    t = 9  # a Part B position of both samples (sep 5 and 7)
    changed = input_ids.clone()
    changed[:, t] = (changed[:, t] + 1) % 100
    after = model(changed, *rest)
    assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=1e-6)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min() > 1e-4
    changed = input_ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 100  # a Part A token: Part A is bidirectional, so position 0 sees it
    assert (model(changed, *rest)[:, 0] - before[:, 0]).abs().amax(dim=-1).min() > 1e-4


def test_parameter_names_and_seeded_init():
    config = tiny_config(**SWITCH_SETS["glm"])
    model = GLMModel(config, seed=3)
    names = dict(model.named_parameters())
    assert "embedding.word_embeddings.weight" in names and "embedding.position_embeddings.weight" in names
    assert "transformer.layers.1.attention.query_key_value.weight" in names
    assert "transformer.layers.0.mlp.dense_4h_to_h.weight" in names
    assert "transformer.final_layernorm.bias" in names
    other = GLMModel(config, seed=3)
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name


def test_untied_output_layer_has_its_own_weight():
    config = tiny_config(**SWITCH_SETS["glm4"])
    model = GLMModel(config, seed=3)
    names = dict(model.named_parameters())
    assert names["output_layer.weight"].shape == (128, 32)  # the vocabulary padded to 128 rows
    assert not torch.equal(names["output_layer.weight"], names["embedding.word_embeddings.weight"])
    assert "transformer.final_layernorm.bias" not in names and "transformer.layers.0.mlp.dense_4h_to_h.bias" not in names
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    hidden = torch.randn(2, 3, 32)
    assert_close(model.logits(hidden), hidden @ names["output_layer.weight"].T)


def _gather(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, shard.contiguous(), group=group)
    return torch.cat(shards, dim=dim)


def _full_grads(model: GLMModel, config: ModelConfig, group, tp: int) -> dict:
    """Every gradient as its full, logical matrix: shards gathered, fused q/k/v and GeGLU halves unfolded,
    the vocabulary padding dropped (after checking that it gets no gradient)."""
    grads = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            grad = param.grad
            if group is not None and isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding, OutputLayer)):
                grad = _gather(grad, 0, group)
            if group is not None and isinstance(module, RowParallelLinear) and param_name == "weight":
                grad = _gather(grad, 1, group)
            if module_name.endswith("query_key_value"):
                grad = torch.cat(split_rank_major(grad, config.qkv_rows, tp))
            if module_name.endswith("dense_h_to_4h") and config.gated_mlp:
                grad = torch.cat(split_rank_major(grad, [config.ffn_size] * 2, tp))
            if isinstance(module, (VocabParallelEmbedding, OutputLayer)):
                assert not grad[config.vocab_size:].any()
                grad = grad[:config.vocab_size]
            grads[f"{module_name}.{param_name}"] = grad
    return grads


def _tp_parity(rank: int, world_size: int, switches: dict) -> None:
    """tp = world_size against tp = 1: loss, logits, every gradient and the gradient norm (each weight counted
    once: trainer/engine/grad_norm.py)."""
    from trainer.engine.grad_norm import counted_in_norm, global_grad_norm

    config = tiny_config(**switches)  # vocabulary 100: padded to 128 rows at tp=1, 128 * tp at tp > 1
    inputs, target = glm_batch()
    group = Topology.create(tp=world_size, pp=1).tp_group
    results = []
    for tp_group, tp in ((None, 1), (group, world_size)):
        model = GLMModel(config, tp_group, seed=11)
        logits = model(*inputs)
        loss = GLMLoss(config, tp_group)(logits, target)
        loss.backward()
        full_logits = logits if tp_group is None else _gather(logits, -1, group)
        norm = global_grad_norm(counted_in_norm(model.parameters(), rank if tp > 1 else 0), tp_group, "cpu")
        results.append((loss.detach(), full_logits[..., :config.vocab_size].detach(),
                        _full_grads(model, config, tp_group, tp), norm))
    (loss1, logits1, grads1, norm1), (loss2, logits2, grads2, norm2) = results
    assert_close(loss2, loss1, atol=1e-5, rtol=1e-5)
    assert_close(logits2, logits1, atol=1e-5, rtol=1e-5)
    assert grads1.keys() == grads2.keys()
    for name, grad1 in grads1.items():
        assert_close(grads2[name], grad1, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert_close(norm2, norm1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("switches", list(SWITCH_SETS.values()), ids=list(SWITCH_SETS))
def test_tp2_equals_tp1(switches):
    run_distributed(_tp_parity, 2, switches)


def test_tp4_replicating_two_key_value_heads_equals_tp1():
    """4 query heads sharing 2 key/value heads at tp = 4: ranks 0, 1 compute KV head 0, ranks 2, 3 KV head 1."""
    run_distributed(_tp_parity, 4, SWITCH_SETS["glm4"])


def packed_row(lengths_and_seps: list[tuple[int, int]], s: int, vocab: int = 100):
    """Random blank-infilling-shaped samples (Part A of sep tokens, then one Part B span) laid end to end in
    one row of s slots: (inputs, labels, each sample's (start, length), each sample alone as its own inputs)."""
    generator = torch.Generator().manual_seed(1)
    columns = {key: [] for key in ("ids", "labels", "positions", "blocks", "start", "sep")}
    alone, bounds, start = [], [], 0
    for length, sep in lengths_and_seps:
        index = torch.arange(length)
        sample = {"ids": torch.randint(0, vocab, (length,), generator=generator),
                  "labels": torch.randint(0, vocab, (length,), generator=generator),
                  "positions": torch.where(index >= sep, sep - 1, index),
                  "blocks": torch.where(index >= sep, index - sep + 1, 0)}
        for key, value in sample.items():
            columns[key].append(value)
        columns["start"].append(torch.full((length,), start))
        columns["sep"].append(torch.full((length,), start + sep))
        alone.append(((sample["ids"][None], sample["positions"][None], sample["blocks"][None],
                       segments_of_sep(torch.tensor([sep]), length)), sample["labels"][None]))
        bounds.append((start, length))
        start += length
    pad = s - start
    row = {key: torch.cat(values + [torch.zeros(pad, dtype=torch.long)]) for key, values in columns.items()}
    row["start"][start:] = row["sep"][start:] = start
    segments = torch.stack([row["start"], row["sep"]])[None]  # [1, 2, s]
    inputs = (row["ids"][None], row["positions"][None], row["blocks"][None], segments)
    return inputs, row["labels"][None], bounds, alone


PACKED = [(9, 5), (7, 3), (12, 8), (5, 2)]


@pytest.mark.parametrize("position_embedding", ["learned_2d", "rope_1d", "rope_2d"])
def test_packed_samples_have_the_per_token_losses_of_each_sample_alone(position_embedding):
    from trainer.parallel.cross_entropy import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    config = tiny_config(position_embedding=position_embedding)
    model = GLMModel(config, seed=5)
    inputs, labels, bounds, alone = packed_row(PACKED, 40)
    packed = vocab_parallel_cross_entropy(model(*inputs), labels, None, vocab_size=100)[0]  # [s]
    for (start, length), (sample_inputs, sample_labels) in zip(bounds, alone):
        own = vocab_parallel_cross_entropy(model(*sample_inputs), sample_labels, None, vocab_size=100)[0]
        assert_close(packed[start:start + length], own, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("position_embedding", ["learned_2d", "rope_1d", "rope_2d"])
def test_no_gradient_crosses_from_one_packed_sample_to_another(position_embedding):
    """d(loss of sample j) / d(input embeddings of every other slot) is exactly zero."""
    from trainer.parallel.cross_entropy import vocab_parallel_cross_entropy

    config = tiny_config(position_embedding=position_embedding)
    model = GLMModel(config, seed=5)
    inputs, labels, bounds, _ = packed_row(PACKED, 40)
    for start, length in bounds:
        activations = model.embedding(inputs)
        embeddings = activations[0].detach().requires_grad_()  # [1, s, h]: the blocks' input
        hidden = (embeddings, *activations[1:])
        for layer in model.transformer["layers"]:
            hidden = layer(hidden)
        logits = model.logits(model.transformer["final_layernorm"](hidden))
        loss = vocab_parallel_cross_entropy(logits, labels, None, vocab_size=100)[0, start:start + length].sum()
        (grad,) = torch.autograd.grad(loss, embeddings)
        outside = torch.ones(grad.shape[1], dtype=torch.bool)
        outside[start:start + length] = False
        assert torch.equal(grad[0, outside], torch.zeros_like(grad[0, outside]))
        assert grad[0, start:start + length].abs().sum() > 0


COMPOSED = ["glm", "glm130b_rope2d", "glm4"]
"""Tied and untied heads, learned and rotary positions, LayerNorm and RMSNorm, GQA."""


def _pipeline_sequence(config: ModelConfig, seed: int) -> list:
    """The pipeline's LayerSpecs (trainer/engine/pipeline.py) built in one process, as DeepSpeed builds them on
    a single stage: a TiedLayerSpec whose key is built already reuses that module. -> [(spec, module)]."""
    from trainer.engine.pipeline import build_layer_specs

    built, sequence = {}, []
    for spec in build_layer_specs(config, Topology.single(), seed):
        key = getattr(spec, "key", None)
        if key is None or key not in built:
            module = spec.build()
            built[key] = module
        sequence.append((spec, built[key]))
    return sequence


@pytest.mark.parametrize("name", COMPOSED)
def test_pipeline_specs_plain_module_and_model_are_one_composition(name):
    """The pipeline's layers, the plain engine's GLMTrainModel and GLMModel come from glm_pieces: the same
    parameter names (piece name + layer parameter) and the same logits / loss on one batch."""
    from trainer.engine.plain import GLMTrainModel
    from trainer.model.glm import glm_pieces

    config = tiny_config(**SWITCH_SETS[name])
    model = GLMModel(config, seed=7)
    pieces = glm_pieces(config, None, 7)
    sequence = _pipeline_sequence(config, 7)
    assert [type(module) for _, module in sequence][:-1] == [piece.module for piece in pieces][:-1]
    pipeline_names = {f"{piece.name}.{param}": value for piece, (spec, module) in zip(pieces, sequence)
                      if piece.role != "head" or not config.tie_word_embeddings
                      for param, value in module.state_dict().items()}
    assert pipeline_names.keys() == model.state_dict().keys()
    trained = GLMTrainModel(config, None, seed=7)
    assert trained.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():  # one seed, one initialisation, whichever form built it
        assert torch.equal(pipeline_names[key], value) and torch.equal(trained.state_dict()[key], value), key

    inputs, (labels, loss_mask) = glm_batch()
    x = inputs
    for spec, module in sequence:  # the pipeline's forward, stage by stage on one rank
        forward_fn = getattr(spec, "forward_fn", None)
        x = module(x) if forward_fn is None else forward_fn(module, x)
    logits = model(*inputs)
    assert_close(vocab_parallel_logits(*x), logits, rtol=0, atol=0)
    loss = GLMLoss(config)(logits, (labels, loss_mask))
    assert_close(trained(inputs, (labels, loss_mask)), loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", COMPOSED)
def test_kv_cached_decoding_gives_the_full_forward_logits(name):
    """GLMModel fed a prefix and then one token at a time with its KV caches (the decoding path) gives, at
    every position, the logits of one forward over the whole sequence."""
    torch.manual_seed(0)
    config = tiny_config(**SWITCH_SETS[name])
    model = GLMModel(config, seed=5).eval()
    (input_ids, position_ids, block_position_ids, _), _ = glm_batch(b=1)
    sep, s = 7, input_ids.shape[1]
    full = model(input_ids, position_ids, block_position_ids, segments_of_sep(torch.tensor([sep]), s))
    caches = model.kv_caches()
    assert len(caches) == config.num_layers
    pieces, start = [], 0
    for end in [sep] + list(range(sep + 1, s + 1)):  # Part A at once, then Part B token by token
        chunk = (t[:, start:end] for t in (input_ids, position_ids, block_position_ids))
        pieces.append(model(*chunk, segments_of_sep(torch.tensor([sep]), end - start), kv_caches=caches))
        start = end
    assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_the_loss_normaliser_divides_the_sum():
    """GLMLoss with a normaliser (the engine's share of the step's loss tokens) is sum(CE * mask) / normaliser;
    without one, the micro-batch's own token mean."""
    config = tiny_config(**SWITCH_SETS["glm"])
    model = GLMModel(config, seed=3)
    inputs, (labels, loss_mask) = glm_batch()
    logits = model(*inputs)
    mean = GLMLoss(config)(logits, (labels, loss_mask))
    tokens = loss_mask.sum()
    assert_close(GLMLoss(config)(logits, (labels, loss_mask, torch.tensor(2.5))), mean * tokens / 2.5)
    from_head = GLMLoss(config)(model.head_inputs(inputs), (labels, loss_mask, torch.tensor(2.5)))
    assert_close(from_head, mean * tokens / 2.5)
