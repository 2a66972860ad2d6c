"""PREFIX.bin/.idx: round trip, dtype by vocabulary, zero-copy reads, and every corruption refused."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.data.indexed import HEADER, IndexedDataset, IndexedDatasetWriter, dtype_for_vocab
from trainer.errors import DataError

DOCS = [np.array([5, 6, 7]), np.array([], dtype=np.int64), np.array([65535, 0]), np.arange(100)]


def write(prefix, docs=DOCS, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_round_trip_keeps_documents_and_reads_without_copies(tmp_path, dtype):
    write(tmp_path / "c", dtype=dtype)
    ds = IndexedDataset(tmp_path / "c")
    assert len(ds) == len(DOCS) and ds.dtype == np.dtype(dtype) and ds.num_tokens == sum(map(len, DOCS))
    for d, doc in enumerate(DOCS):
        np.testing.assert_array_equal(ds[d], doc)
    assert isinstance(ds.tokens, np.memmap) and np.shares_memory(ds[3], ds.tokens)
    np.testing.assert_array_equal(ds.doc_lengths, [3, 0, 2, 100])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.idx"]
    assert (tmp_path / "c.bin").stat().st_size == ds.num_tokens * np.dtype(dtype).itemsize


def test_dtype_follows_the_vocabulary():
    assert dtype_for_vocab(4096) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32 and dtype_for_vocab(150528) == np.uint32


def test_a_failure_while_writing_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "c", np.uint16) as writer:
            writer.add_document(np.arange(10))
            raise RuntimeError("tokenizer crashed")
    with pytest.raises(DataError, match="does not fit uint16"):
        write(tmp_path / "c", [np.array([70000])])
    assert list(tmp_path.iterdir()) == []


def test_corrupted_files_are_refused(tmp_path):
    prefix = tmp_path / "c"
    with pytest.raises(DataError, match=r"c\.idx does not exist.*glm-prep"):
        IndexedDataset(prefix)
    write(prefix)
    idx, binary = tmp_path / "c.idx", tmp_path / "c.bin"
    good_idx, good_bin = idx.read_bytes(), binary.read_bytes()

    binary.write_bytes(good_bin[:-2])
    with pytest.raises(DataError, match="truncated"):
        IndexedDataset(prefix)
    binary.write_bytes(good_bin)

    idx.write_bytes(b"NOTANIDX" + good_idx[8:])
    with pytest.raises(DataError, match="wrong magic"):
        IndexedDataset(prefix)
    idx.write_bytes(good_idx[:8] + (7).to_bytes(8, "little") + good_idx[16:])
    with pytest.raises(DataError, match="format version 7"):
        IndexedDataset(prefix)
    idx.write_bytes(good_idx[:HEADER.size + 8])
    with pytest.raises(DataError, match="truncated"):
        IndexedDataset(prefix)
    binary.unlink()
    idx.write_bytes(good_idx)
    with pytest.raises(DataError, match=r"c\.bin does not exist"):
        IndexedDataset(prefix)
