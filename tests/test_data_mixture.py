"""Dataset mixing: the configured shares of samples or tokens, each dataset read in its own order without
gaps, a stream that is a function of (seed, index) and identical at dp=1 and dp=2, config refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from trainer.data.config import DataConfig
from trainer.data.corpus import embedded_documents, prepare
from trainer.data.dataset import build_dataset, micro_batch_indices
from trainer.data.instruction import as_documents, write_marker
from trainer.data.mixture import BLOCK, block_counts, sample_shares
from trainer.data.packing import build_sequences
from trainer.data.tokenizer import train_tokenizer
from trainer.errors import ConfigError, DataError

DOCUMENTS = embedded_documents()[:6]
RECORDS = [(f"question {i}?", f" answer {i}.") for i in range(30)]


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    tokenizer = train_tokenizer(DOCUMENTS, 700)
    prepare(DOCUMENTS, root / "text", tokenizer, workers=1, progress=False)
    prepare(as_documents(RECORDS), root / "sft", tokenizer, workers=1, progress=False)
    write_marker(root / "sft", len(RECORDS))
    return str(root / "text"), str(root / "sft")


def mixed(prefixes, unit="samples", share=0.05, **overrides) -> DataConfig:
    return DataConfig(seq_length=64, modes={"mask": 0.3, "gmask": 0.7}, mixture_unit=unit,
                      datasets=[{"path": prefixes[0], "weight": 1 - share}, {"path": prefixes[1], "weight": share}],
                      **overrides)


def test_sample_shares_are_exact_per_block_and_each_dataset_reads_its_own_order(prefixes):
    ds = build_dataset(mixed(prefixes), seed=11)
    located = [ds.locate(i) for i in range(4 * BLOCK)]
    component = np.array([c for c, _ in located])
    for b in range(4):  # GLM-130B's 5%: exactly 50 instruction samples in every block of 1000
        assert np.count_nonzero(component[b * BLOCK:(b + 1) * BLOCK] == 1) == 50
    window = component[:200]  # spread through the block, not in a run
    assert 0 < np.count_nonzero(window == 1) < 50
    for c in (0, 1):  # every dataset is read at 0, 1, 2, ... in the order of the mixture
        assert [local for comp, local in located if comp == c] == list(range(np.count_nonzero(component == c)))
    sample = ds[int(np.flatnonzero(component == 1)[0])]
    first = ds.components[1][0]
    for key in first:
        np.testing.assert_array_equal(sample[key], first[key])
    again = build_dataset(mixed(prefixes), seed=11)
    assert [again.locate(i) for i in range(BLOCK)] == located[:BLOCK]
    assert [build_dataset(mixed(prefixes), seed=12).locate(i) for i in range(BLOCK)] != located[:BLOCK]


def test_token_shares_follow_the_weights(prefixes):
    ds = build_dataset(mixed(prefixes, unit="tokens", share=0.2), seed=0)
    means = [float(np.mean(c.source_tokens())) for c in ds.components]
    weights = np.array([0.8 / means[0], 0.2 / means[1]])
    torch.testing.assert_close(torch.tensor(ds.shares), torch.tensor(weights / weights.sum()))
    tokens = np.zeros(2)
    for i in range(2 * BLOCK):
        c, _ = ds.locate(i)
        sample = ds[i]
        # the corpus tokens a sample carries: all of it but [CLS], its mask tokens and its sop tokens
        tokens[c] += int((sample["loss_mask"] == 1).sum() + sample["sep"]) - 1 - 2 * int(
            (sample["block_position_ids"] == 1).sum())
    assert abs(tokens[1] / tokens.sum() - 0.2) < 0.02, tokens


def test_largest_remainder_counts():
    counts = block_counts(sample_shares([1, 1, 1], [1, 1, 1], "samples"))
    assert counts.sum() == BLOCK and sorted(counts.tolist()) == [333, 333, 334]
    with pytest.raises(ConfigError, match=r"data.datasets\[1\]"):
        block_counts(sample_shares([1, 1e-5], [1, 1], "samples"))


def _dp_stream(rank, world_size, prefixes, out):
    from trainer.parallel.topology import Topology

    topology = Topology.create(1, 1)
    _write_stream(build_sequences(mixed(prefixes, share=0.3), seed=5), topology, micro_batch_size=2,
                  out=out.with_suffix(f".rank{rank}.json"))


def _write_stream(rows, topology, micro_batch_size, out, steps=6, global_batch=8):
    from trainer.engine.loop import collated_micro_batches, micro_batches

    stream = {}
    for step in range(steps):
        consumed, accum = step * global_batch, global_batch // (micro_batch_size * topology.dp)
        batches, _ = micro_batches(collated_micro_batches(rows, consumed, accum, topology, micro_batch_size), topology)
        for micro_step, ((ids, positions, blocks, segments), (labels, mask, *_)) in enumerate(batches):
            indices = micro_batch_indices(consumed, micro_step, topology.dp_rank, topology.dp, micro_batch_size)
            for row, index in enumerate(indices):
                stream[index] = [t[row].tolist() for t in (ids, positions, blocks, segments, labels, mask)]
    out.write_text(json.dumps(stream))


def test_mixed_stream_is_identical_at_dp1_and_dp2(prefixes, tmp_path):
    from trainer.parallel.topology import Topology

    single = tmp_path / "dp1.json"
    _write_stream(build_sequences(mixed(prefixes, share=0.3), seed=5), Topology.single(), 4, single)
    run_distributed(_dp_stream, 2, prefixes, tmp_path / "dp2")
    merged = {}
    for rank in range(2):
        merged.update(json.loads((tmp_path / f"dp2.rank{rank}.json").read_text()))
    reference = json.loads(single.read_text())
    assert sorted(map(int, merged)) == list(range(48)) and merged == reference


def test_mixture_config_refusals(prefixes, tmp_path):
    with pytest.raises(ConfigError, match="data.path and data.datasets"):
        DataConfig(path=prefixes[0], datasets=[{"path": prefixes[1], "weight": 1}]).validate()
    with pytest.raises(ConfigError, match=r"data.datasets\[0\]"):
        DataConfig(datasets=[{"path": prefixes[1], "weight": 0}]).validate()
    with pytest.raises(ConfigError, match="mixture_unit"):
        DataConfig(mixture_unit="bytes").validate()
    other = tmp_path / "other"
    prepare(DOCUMENTS[:2], other, train_tokenizer(DOCUMENTS[:2], 400), workers=1, progress=False)
    with pytest.raises(DataError, match="one tokenizer"):
        build_dataset(DataConfig(seq_length=64, datasets=[{"path": prefixes[0], "weight": 1},
                                                          {"path": str(other), "weight": 1}]), seed=0)
