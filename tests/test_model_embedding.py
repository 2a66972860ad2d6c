"""The embedding: 2D learned positions, the gradient shrink, vocabulary padding, the tied output layer."""
import pytest
import torch
from torch.testing import assert_close

from trainer.errors import ConfigError
from trainer.model.config import ModelConfig
from trainer.model.embedding import GLMEmbedding
from trainer.model.mask import segments_of_sep
from trainer.model.output import head_outputs, vocab_parallel_logits


def _inputs():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 6))
    positions = torch.tensor([[0, 1, 2, 3, 2, 2], [0, 1, 2, 3, 4, 1]])
    blocks = torch.tensor([[0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 0, 1]])
    return ids, positions, blocks, segments_of_sep(torch.tensor([4, 5]), ids.shape[1])


def _config(**switches):
    return ModelConfig(hidden_size=16, vocab_size=100, max_sequence_length=8, hidden_dropout=0.0, **switches)


def test_learned_2d_sum_and_padding():
    embedding = GLMEmbedding(_config(), seed=5)
    ids, positions, blocks, sep = _inputs()
    hidden, *rest = embedding((ids, positions, blocks, sep))
    want = (embedding.word_embeddings.weight[ids] + embedding.position_embeddings.weight[positions]
            + embedding.block_position_embeddings.weight[blocks])
    assert_close(hidden, want)
    assert rest[0] is positions and rest[1] is blocks and rest[2] is sep
    assert embedding.word_embeddings.weight.shape == (128, 16)
    assert not embedding.word_embeddings.weight[100:].any()


def test_embedding_shrink_keeps_the_value_and_scales_the_gradient():
    ids, positions, blocks, sep = _inputs()
    outputs, grads = [], []
    for alpha in (1.0, 0.1):
        embedding = GLMEmbedding(_config(embedding_shrink_alpha=alpha), seed=5)
        hidden = embedding((ids, positions, blocks, sep))[0]
        (hidden.sin() * torch.arange(16.0)).sum().backward()  # any non-trivial function of the output
        outputs.append(hidden.detach())
        grads.append([p.grad for p in (embedding.word_embeddings.weight, embedding.position_embeddings.weight,
                                       embedding.block_position_embeddings.weight)])
    assert_close(outputs[1], outputs[0])
    for shrunk, full in zip(grads[1], grads[0]):
        assert_close(shrunk, 0.1 * full)


def test_tied_logits_and_rope_has_no_tables():
    embedding = GLMEmbedding(_config(position_embedding="rope_1d"), seed=5)
    assert not hasattr(embedding, "position_embeddings")
    hidden = torch.randn(2, 3, 16)
    assert_close(vocab_parallel_logits(*head_outputs(embedding, hidden)), hidden @ embedding.word_embeddings.weight.T)


def test_same_seed_same_weights_and_missing_vocab_is_refused():
    a, b = GLMEmbedding(_config(), seed=5), GLMEmbedding(_config(), seed=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_close(pa, pb)
    with pytest.raises(ConfigError, match="vocab_size"):
        GLMEmbedding(ModelConfig(vocab_size=0))
