"""The GLM mask of trainer/model/mask.py: the rule against a slot-by-slot reference for packed rows, the
one-sample form against GLM's sep mask, and the FlexAttention block mask (its values, and the tiles it
skips between packed samples)."""
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.model.attention import flex_glm_attention
from trainer.model.mask import GLMMask, dense_mask, segments_of_sep


def packed_segments(samples: list[list[tuple[int, int]]], s: int) -> torch.Tensor:
    """Rows of samples given as (length, sep) each, laid end to end, then a padding segment -> [b, 2, s]."""
    rows = []
    for row in samples:
        start_of, sep_of, start = [], [], 0
        for length, sep in row:
            start_of += [start] * length
            sep_of += [start + sep] * length
            start += length
        start_of += [start] * (s - start)
        sep_of += [start] * (s - start)
        rows.append([start_of, sep_of])
    return torch.tensor(rows)


def reference_mask(samples: list[list[tuple[int, int]]], s: int) -> torch.Tensor:
    """[b, 1, s, s] slot by slot: inside a sample, Part A rows see Part A; Part B rows see Part A and
    Part B causally; nothing across samples; padding rows see the padding up to themselves."""
    mask = torch.zeros(len(samples), 1, s, s, dtype=torch.bool)
    for b, row in enumerate(samples):
        bounds, start = [], 0
        for length, sep in row:
            bounds.append((start, start + sep, start + length))
            start += length
        bounds.append((start, start, s))
        for first, part_a_end, end in bounds:
            for i in range(first, end):
                for j in range(first, end):
                    mask[b, 0, i, j] = j < part_a_end or j <= i
    return mask


ROWS = [[(5, 3), (4, 2), (6, 6)], [(7, 1), (3, 2)], [(20, 9)], [(2, 1)] * 9 + [(1, 1)]]


def test_dense_mask_is_block_diagonal_glm_masks():
    s = 20
    assert torch.equal(dense_mask(packed_segments(ROWS, s)), reference_mask(ROWS, s))


def test_one_sample_per_row_is_glms_sep_mask():
    s, sep = 12, torch.tensor([1, 5, 11, 12])
    mask = dense_mask(segments_of_sep(sep, s))
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    assert torch.equal(mask, ((j < sep[:, None, None]) | (j <= i))[:, None])


def test_kv_cached_rows_are_the_last_rows_of_the_full_mask():
    s = 20
    segments = packed_segments(ROWS, s)
    full = dense_mask(segments)
    assert torch.equal(dense_mask(segments[:, :, 13:], num_keys=s), full[:, :, 13:])


def test_every_row_sees_itself():
    mask = dense_mask(packed_segments(ROWS, 20))
    assert mask.diagonal(dim1=-2, dim2=-1).all()


def test_flex_attention_equals_sdpa_on_packed_rows():
    """FlexAttention's block mask (eager reference kernel on CPU, forward) against SDPA with the dense mask,
    with samples crossing tile boundaries."""
    torch.manual_seed(0)
    s, n, d = 384, 2, 16
    rows = [[(100, 40), (200, 30), (60, 60)], [(130, 129), (128, 3)], [(384, 200)]]
    mask = GLMMask(packed_segments(rows, s))
    q, k, v = (torch.randn(len(rows), n, s, d) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())
    assert_close(flex_glm_attention(q, k, v, mask.block_mask()), expected, atol=1e-5, rtol=1e-5)


def test_block_mask_skips_the_tiles_between_packed_samples():
    s = 512
    mask = GLMMask(packed_segments([[(256, 200), (256, 200)]], s)).block_mask()
    tiles = mask.to_dense()[0, 0]  # [q tiles, kv tiles] (128 x 128): 1 where the kernel computes the tile
    assert tiles.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_glm_mask_is_shared_while_segments_are_unchanged():
    segments = packed_segments(ROWS, 20)
    mask = GLMMask.of(segments)
    assert GLMMask.of(segments) is mask and not mask.dense()[0, 0, 0, 3]
    segments[0, 1, 0] = 4  # changed in place (slot 0 now sees slot 3): rebuilt
    changed = GLMMask.of(segments)
    assert changed is not mask and changed.dense()[0, 0, 0, 3]
