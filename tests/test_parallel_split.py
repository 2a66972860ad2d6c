"""Split rules: each kind shards a full tensor into the blocks the layers hold and merges them back exactly;
split_rules_of collects the layers' declarations and refuses a parameter that no layer declares."""
import pytest
import torch
from torch import nn

from trainer.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from trainer.parallel.split import REPLICATED, SplitRule, declared, split_rank_major, split_rules_of


def _rows(count: int, start: float = 0.0) -> torch.Tensor:
    """[count, 2], row i = (start + i, start + i + 0.5): every row tells where it came from."""
    values = start + torch.arange(float(count))[:, None]
    return torch.cat([values, values + 0.5], dim=1)


def _round_trip(rule: SplitRule, full: torch.Tensor, size: int) -> list[torch.Tensor]:
    shards = [rule.shard(full, rank, size) for rank in range(size)]
    assert all(tuple(shard.shape) == rule.shard_shape(full.shape, size) for shard in shards)
    assert torch.equal(rule.merge(shards), full)
    return shards


def test_replicated_and_plain_splits():
    full = torch.arange(24.0).view(4, 6)
    assert all(torch.equal(shard, full) for shard in _round_trip(REPLICATED, full, 2))
    assert torch.equal(_round_trip(SplitRule(dim=0), full, 2)[1], full[2:])
    assert torch.equal(_round_trip(SplitRule(dim=1), full, 3)[2], full[:, 4:])


def test_fused_grouped_query_parts_are_rank_major():
    """q [8 rows], k and v [4 rows] each: rank r holds [q_r; k_r; v_r], the r-th row block of each part."""
    q, k, v = _rows(8), _rows(4, 10), _rows(4, 20)
    rule = SplitRule(dim=0, part_rows=(8, 4, 4))
    full = torch.cat([q, k, v])
    for size in (1, 2, 4):
        shards = _round_trip(rule, full, size)
        for rank, shard in enumerate(shards):
            assert torch.equal(shard, torch.cat([q.chunk(size)[rank], k.chunk(size)[rank], v.chunk(size)[rank]]))
        assert all(torch.equal(got, want)
                   for got, want in zip(split_rank_major(torch.cat(shards), (8, 4, 4), size), (q, k, v)))


def test_fused_parts_on_another_dim_are_rank_major_there():
    """Routed experts' [E, 2f, h] gate/up weight: the two halves stacked on dim 1, each split over the ranks."""
    gate, up = torch.arange(48.0).view(2, 4, 6), -torch.arange(48.0).view(2, 4, 6)
    rule = SplitRule(dim=1, part_rows=(4, 4))
    shards = _round_trip(rule, torch.cat([gate, up], dim=1), 2)
    for rank, shard in enumerate(shards):
        assert torch.equal(shard, torch.cat([gate.chunk(2, dim=1)[rank], up.chunk(2, dim=1)[rank]], dim=1))


def test_vocabulary_is_padded_per_size_and_merged_back_to_the_real_rows():
    full = _rows(10, 1.0)
    rule = SplitRule.vocabulary(10, pad_multiple=4)
    assert [rule.padded_rows(size) for size in (1, 2, 3)] == [12, 16, 12]
    shards = _round_trip(rule, full, 2)  # 16 rows: 8 per rank, the last 6 of rank 1 padding
    assert torch.equal(shards[0], full[:8])
    assert torch.equal(shards[1][:2], full[8:]) and not shards[1][2:].any()
    _round_trip(rule, full, 3)


def test_rules_that_cannot_be_split_are_refused():
    with pytest.raises(ValueError, match="dim 0"):
        SplitRule(dim=1, vocab_rows=4)
    with pytest.raises(ValueError, match="not both"):
        SplitRule(dim=0, part_rows=(2, 2), vocab_rows=4)
    with pytest.raises(ValueError, match="sum to out_features"):
        ColumnParallelLinear(4, 6, group=None, parts=(2, 2))


class _Block(nn.Module):
    """A layer type of its own: a column-parallel weight, a row-parallel one and a plain torch child it declares."""

    def __init__(self, declare_table: bool = True):
        super().__init__()
        self.up = ColumnParallelLinear(4, 6, group=None, parts=(4, 2))
        self.down = RowParallelLinear(6, 4, group=None, bias=False)
        self.table = nn.Embedding(3, 4)
        self.declare_table = declare_table

    def split_rules(self):
        return {"table.weight": REPLICATED} if self.declare_table else {}


def test_split_rules_of_collects_every_layers_rules_under_the_parameter_names():
    model = nn.ModuleDict({"block": _Block(), "embedding": VocabParallelEmbedding(10, 4, group=None, pad_multiple=8)})
    assert split_rules_of(model) == {
        "block.up.weight": SplitRule(dim=0, part_rows=(4, 2)), "block.up.bias": SplitRule(dim=0, part_rows=(4, 2)),
        "block.down.weight": SplitRule(dim=1), "block.table.weight": REPLICATED,
        "embedding.weight": SplitRule.vocabulary(10, 8)}
    assert model["embedding"].weight.shape == (16, 4) and not model["embedding"].weight[10:].any()


def test_a_parameter_without_a_rule_is_refused_by_name():
    with pytest.raises(TypeError, match="block.table.weight has no tensor-parallel split rule"):
        split_rules_of(nn.ModuleDict({"block": _Block(declare_table=False)}))
    layer = RowParallelLinear(6, 4, group=None, bias=False)
    layer.split_rules = lambda: {"weight": SplitRule(dim=1), "bias": REPLICATED}
    with pytest.raises(TypeError, match="declares bias, which is not a parameter"):
        split_rules_of(layer)
    assert declared(layer, {"weight": SplitRule(dim=1), "bias": REPLICATED}) == {"weight": SplitRule(dim=1)}
