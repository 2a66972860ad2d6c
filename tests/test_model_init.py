"""Seeded full-matrix initialisation: layout-free values, fused parts drawn in order (their tensor-parallel split:
tests/test_parallel_split.py)."""
import torch
from torch.testing import assert_close

from trainer.model.init import fused_normal_init, normal_init, seeded_generator, xavier_normal_std


def test_generator_depends_on_seed_and_name_only():
    draw = lambda seed, name: torch.randn(4, generator=seeded_generator(seed, name))
    assert_close(draw(1, "layers.0.mlp.dense_4h_to_h"), draw(1, "layers.0.mlp.dense_4h_to_h"))
    assert not torch.equal(draw(1, "layers.0.mlp.dense_4h_to_h"), draw(1, "layers.1.mlp.dense_4h_to_h"))
    assert not torch.equal(draw(1, "layers.0.mlp.dense_4h_to_h"), draw(2, "layers.0.mlp.dense_4h_to_h"))


def test_fused_parts_are_drawn_in_order_from_one_generator():
    """q [8 rows] and k, v [4 rows] each (grouped-query attention), each from the name's one generator in turn."""
    weight = torch.empty(16, 3)
    fused_normal_init(1, "w", (1.0, 2.0, 3.0), part_rows=(8, 4, 4))(weight)
    generator = seeded_generator(1, "w")
    expected = [torch.empty(rows, 3).normal_(0.0, std, generator=generator)
                for rows, std in ((8, 1.0), (4, 2.0), (4, 3.0))]
    assert torch.equal(weight, torch.cat(expected))


def test_a_single_part_is_normal_init():
    fused, plain = torch.empty(6, 5), torch.empty(6, 5)
    fused_normal_init(2, "w", (0.3,))(fused)
    normal_init(2, "w", 0.3)(plain)
    assert torch.equal(fused, plain)


def test_fused_part_stds():
    weight = torch.empty(3 * 256, 256)
    fused_normal_init(0, "w", (0.5, 1.0, 0.1))(weight)
    for part, std in zip(weight.split(256), (0.5, 1.0, 0.1)):
        assert abs(part.std().item() / std - 1) < 0.02


def test_meta_weights_are_left_alone():
    weight = torch.empty(4, 4, device="meta")
    normal_init(0, "w", 0.02)(weight)
    fused_normal_init(0, "w", (1.0, 1.0))(weight)


def test_xavier_std():
    assert abs(xavier_normal_std(0.5, 100, 300) - 0.5 * (2 / 400) ** 0.5) < 1e-12
