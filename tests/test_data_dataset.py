"""Sequences, wrap-around with per-epoch reshuffling, data-parallel sharding, splits, batches, file checks."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from trainer.data.blank_infilling import MODES, sample_rng
from trainer.data.config import DataConfig
from trainer.data.corpus import embedded_documents, prepare
from trainer.data.dataset import BATCH_KEYS, build_dataset, check_data_files, collate, cut_sequences, micro_batch_indices
from trainer.data.indexed import IndexedDataset
from trainer.data.tokenizer import train_tokenizer
from trainer.errors import DataError

DOCUMENTS = embedded_documents()[:6]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("corpus") / "small"
    prepare(DOCUMENTS, prefix, train_tokenizer(DOCUMENTS, 700), workers=1, progress=False)
    return str(prefix)


def config(prefix: str, **overrides) -> DataConfig:
    return DataConfig(path=prefix, seq_length=64, modes={"mask": 0.4, "smask": 0.3, "gmask": 0.3}, **overrides)


def test_documents_are_cut_apart_into_near_equal_texts(prefix):
    indexed = IndexedDataset(prefix)
    n = 45
    starts, ends = cut_sequences(indexed.doc_lengths, indexed.offsets, n)
    for d, m in enumerate(indexed.doc_lengths):
        inside = (starts >= indexed.offsets[d]) & (ends <= indexed.offsets[d + 1])
        lengths = (ends - starts)[inside]
        assert len(lengths) == -(-m // n) and lengths.sum() == m and lengths.max() <= n
        assert lengths.max() - lengths.min() <= 1
    np.testing.assert_array_equal(starts[1:], ends[:-1])  # tiles the stream, never crosses a document
    starts, ends = cut_sequences(np.array([0, 3, 0]), np.array([0, 0, 3, 3]), n)
    assert starts.tolist() == [0] and ends.tolist() == [3]


def test_wraps_around_reshuffling_each_epoch_and_logs_it(prefix, caplog):
    ds = build_dataset(config(prefix), seed=7)
    size = len(ds)
    with caplog.at_level(logging.INFO, logger="trainer.data.sequences"):
        texts = [tuple(ds.sequence(i)) for i in range(3 * size)]
    epochs = [texts[e * size:(e + 1) * size] for e in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == size for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    repeats = [r.getMessage() for r in caplog.records if "they repeat" in r.getMessage()]
    assert repeats == [f"data (train): all {size} sequences read once; from sample {size} on they repeat, in a new "
                       f"order each epoch"]  # once, not once per epoch
    again = build_dataset(config(prefix), seed=7)  # e.g. after a resume: same order, same samples
    assert tuple(again.sequence(2 * size + 5)) == texts[2 * size + 5]
    sample, resumed = ds[10 * size + 3], again[10 * size + 3]
    for key in sample:
        np.testing.assert_array_equal(sample[key], resumed[key])
    assert tuple(build_dataset(config(prefix), seed=8).epoch_order(0)) != tuple(ds.epoch_order(0))


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_a_step_takes_the_same_samples_at_every_data_parallel_size(prefix, micro_batch_size):
    ds = build_dataset(config(prefix), seed=3)
    global_batch, consumed = 8, 16
    per_dp = {}
    for dp in (1, 2, 4):
        accumulation = global_batch // (dp * micro_batch_size)
        indices = [micro_batch_indices(consumed, step, rank, dp, micro_batch_size)
                   for step in range(accumulation) for rank in range(dp)]
        per_dp[dp] = sorted(i for batch in indices for i in batch)
    assert per_dp[1] == per_dp[2] == per_dp[4] == list(range(consumed, consumed + global_batch))
    rank1 = collate([ds[i] for i in micro_batch_indices(consumed, 0, 1, 2, micro_batch_size)])
    whole = collate([ds[i] for i in range(consumed, consumed + 2 * micro_batch_size)])
    for key in set(whole) - set(BATCH_KEYS):  # rank 1 of dp=2 sees exactly the samples dp=1 has at those indices
        torch.testing.assert_close(rank1[key], whole[key][micro_batch_size:])


def test_collate_stacks_int64_and_sep_is_one_per_sample(prefix):
    ds = build_dataset(config(prefix), seed=0)
    batch = collate([ds[i] for i in range(3)])
    assert set(batch) == {"input_ids", "labels", "loss_mask", "position_ids", "block_position_ids", "sep", "length",
                          *BATCH_KEYS}
    assert all(batch[key].dtype == torch.int64 for key in set(batch) - {"num_loss_tokens", "num_tokens"})
    assert batch["input_ids"].shape == (3, 64) and batch["sep"].shape == (3,)
    assert batch["sep"].tolist() == [ds[i]["sep"] for i in range(3)]


def test_collate_counts_the_batch_on_the_host(prefix):
    ds = build_dataset(config(prefix), seed=0)
    batch = collate([ds[i] for i in range(3)])
    flat_mask = batch["loss_mask"].reshape(-1)
    torch.testing.assert_close(batch["loss_positions"], torch.nonzero(flat_mask).reshape(-1))
    assert batch["num_loss_tokens"] == int(flat_mask.sum())
    assert batch["num_tokens"] == sum(ds[i]["length"] for i in range(3))


def test_valid_split_is_the_held_out_tail(prefix):
    train = build_dataset(config(prefix, valid_fraction=0.2), seed=0)
    valid = build_dataset(config(prefix, valid_fraction=0.2), seed=0, split="valid")
    everything = build_dataset(config(prefix), seed=0)
    assert len(train) + len(valid) == len(everything) and len(valid) == round(0.2 * len(everything))
    assert not set(train.starts.tolist()) & set(valid.starts.tolist())
    assert valid.starts.min() > train.starts.max()
    with pytest.raises(DataError, match="valid_fraction is 0"):
        build_dataset(config(prefix), seed=0, split="valid")


def test_every_text_of_the_corpus_fits_in_every_mode(prefix):
    ds = build_dataset(config(prefix), seed=0)
    for i in range(len(ds)):
        tokens = ds.sequence(i)
        for mode in MODES:
            sample = ds.infilling(tokens, sample_rng(0, i), mode=mode)
            assert sample["sep"] + sample["loss_mask"].sum() <= 64


def test_embedded_default_is_used_when_no_path_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path))
    ds = build_dataset(DataConfig(seq_length=64), seed=0)
    assert str(tmp_path) in ds.indexed.prefix and 4000 <= ds.tokenizer.vocab_size <= 8000
    assert check_data_files(DataConfig()) == ds.tokenizer.vocab_size


def test_bad_files_are_refused_before_training(prefix, tmp_path):
    copy = tmp_path / "copy"
    for suffix in (".bin", ".idx", ".tokenizer.json"):
        shutil.copy(prefix + suffix, str(copy) + suffix)
    data = config(str(copy))
    assert check_data_files(data) == build_dataset(data, 0).tokenizer.vocab_size
    idx = (tmp_path / "copy.idx").read_bytes()
    (tmp_path / "copy.idx").write_bytes(b"X" + idx[1:])
    with pytest.raises(DataError, match="wrong magic"):
        check_data_files(data)
    (tmp_path / "copy.idx").write_bytes(idx)
    binary = (tmp_path / "copy.bin").read_bytes()
    (tmp_path / "copy.bin").write_bytes(binary[:-10])
    with pytest.raises(DataError, match="truncated"):
        build_dataset(data, 0)
    (tmp_path / "copy.bin").write_bytes(binary)
    train_tokenizer(DOCUMENTS[:1], 280).save(tmp_path / "small.json")
    with pytest.raises(DataError, match="use the tokenizer the data was prepared with"):
        check_data_files(config(str(copy), tokenizer=str(tmp_path / "small.json")))
    with pytest.raises(DataError, match=r"nope\.idx does not exist.*glm-prep"):
        check_data_files(config(str(tmp_path / "nope")))
    (tmp_path / "copy.tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"copy\.tokenizer\.json does not exist"):
        check_data_files(data)
