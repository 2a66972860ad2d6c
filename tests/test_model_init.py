"""Seeded full-matrix initialisation: layout-free values, rank-major fused layouts, vocabulary padding."""
import torch
from torch.testing import assert_close

from trainer.model.init import (fused_normal_init, normal_init, rank_major, seeded_generator, split_rank_major,
                                xavier_normal_std)


def test_generator_depends_on_seed_and_name_only():
    draw = lambda seed, name: torch.randn(4, generator=seeded_generator(seed, name))
    assert_close(draw(1, "layers.0.mlp.dense_4h_to_h"), draw(1, "layers.0.mlp.dense_4h_to_h"))
    assert not torch.equal(draw(1, "layers.0.mlp.dense_4h_to_h"), draw(1, "layers.1.mlp.dense_4h_to_h"))
    assert not torch.equal(draw(1, "layers.0.mlp.dense_4h_to_h"), draw(2, "layers.0.mlp.dense_4h_to_h"))


def test_rank_major_layout_and_inverse():
    q, k, v = (torch.full((4, 2), float(i)) + torch.arange(4.0)[:, None] / 10 for i in range(3))
    full = rank_major([q, k, v], tp=2)
    # rank 0 holds rows 0-1 of q, k, v; rank 1 rows 2-3 of each
    assert_close(full[:6], torch.cat([q[:2], k[:2], v[:2]]))
    assert_close(full[6:], torch.cat([q[2:], k[2:], v[2:]]))
    for got, want in zip(split_rank_major(full, [4] * 3, tp=2), (q, k, v)):
        assert_close(got, want)


def test_fused_parts_do_not_depend_on_tp():
    stds = (1.0, 2.0, 3.0)
    parts = []
    for tp in (1, 2, 4):
        weight = torch.empty(24, 5)
        fused_normal_init(7, "layers.0.attention.query_key_value", stds, tp)(weight)
        parts.append(split_rank_major(weight, [8] * 3, tp))
    for other in parts[1:]:
        for got, want in zip(other, parts[0]):
            assert_close(got, want)


def test_unequal_parts_grouped_query():
    """q [8 rows] and k, v [4 rows] each (grouped-query attention): rank r holds [q_r; k_r; v_r]."""
    q, k, v = torch.arange(8.0)[:, None], 10 + torch.arange(4.0)[:, None], 20 + torch.arange(4.0)[:, None]
    full = rank_major([q, k, v], tp=2)
    assert_close(full[:8], torch.cat([q[:4], k[:2], v[:2]]))
    for got, want in zip(split_rank_major(full, [8, 4, 4], tp=2), (q, k, v)):
        assert_close(got, want)
    weights = []
    for tp in (1, 2):
        weight = torch.empty(16, 3)
        fused_normal_init(1, "w", (1.0, 2.0, 3.0), tp, part_rows=(8, 4, 4))(weight)
        weights.append(split_rank_major(weight, [8, 4, 4], tp))
    for got, want in zip(*weights):
        assert_close(got, want)


def test_fused_part_stds():
    weight = torch.empty(3 * 256, 256)
    fused_normal_init(0, "w", (0.5, 1.0, 0.1), tp=2)(weight)
    for part, std in zip(split_rank_major(weight, [256] * 3, tp=2), (0.5, 1.0, 0.1)):
        assert abs(part.std().item() / std - 1) < 0.02


def test_vocabulary_padding_rows_are_zero_and_values_do_not_depend_on_padding():
    small, large = torch.empty(128, 8), torch.empty(256, 8)
    normal_init(3, "word_embeddings", 0.02, rows=100)(small)
    normal_init(3, "word_embeddings", 0.02, rows=100)(large)
    assert_close(small[:100], large[:100])
    assert not small[100:].any() and not large[100:].any()


def test_meta_weights_are_left_alone():
    weight = torch.empty(4, 4, device="meta")
    normal_init(0, "w", 0.02)(weight)
    fused_normal_init(0, "w", (1.0, 1.0), tp=1)(weight)


def test_xavier_std():
    assert abs(xavier_normal_std(0.5, 100, 300) - 0.5 * (2 / 400) ** 0.5) < 1e-12
