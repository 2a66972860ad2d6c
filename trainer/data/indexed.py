"""The prepared-data format: PREFIX.bin (token ids) + PREFIX.idx (document boundaries), read zero-copy.

PREFIX.idx, little endian:
    bytes 0..7    magic b"GLMIDX\\0\\0"
    bytes 8..15   uint64 format version (1)
    bytes 16..23  uint64 dtype code of the tokens: 2 = uint16, 4 = uint32 (the item size)
    bytes 24..31  uint64 D, the number of documents
    then          int64 offsets[D + 1]: document d is tokens[offsets[d] : offsets[d + 1]], offsets[0] = 0
PREFIX.bin: the tokens of every document back to back, offsets[D] items of the dtype, nothing else.

Both files are memory-mapped: a document is a view into the page cache, never a copy.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
import numpy as np

from trainer.errors import DataError
from trainer.paths import temporary_beside

MAGIC = b"GLMIDX\0\0"
VERSION = 1
HEADER = struct.Struct("<8sQQQ")  # magic, version, dtype code, number of documents
DTYPES = {2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 2**16), else uint32."""
    return DTYPES[2] if vocab_size <= 2 ** 16 else DTYPES[4]


def data_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Appends documents to temporary files and publishes PREFIX.bin/.idx with os.replace only when the
    `with` block ends without an exception; on an exception both temporaries are deleted."""

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        if self.dtype.itemsize not in DTYPES:
            raise DataError(f"token dtype {self.dtype} is not supported: use uint16 or uint32")
        self.bin_path, self.idx_path = data_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.offsets = [0]
        self._tmp: list[Path] = []
        self._bin = None

    def __enter__(self) -> IndexedDatasetWriter:
        self._tmp = [temporary_beside(p) for p in (self.bin_path, self.idx_path)]
        self._bin = open(self._tmp[0], "wb")
        return self

    def add_document(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"token id {int(tokens.max())} does not fit {self.dtype}: the tokenizer's "
                            f"vocabulary is larger than the dtype chosen for it")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.offsets.append(self.offsets[-1] + tokens.size)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bin.close()
        if exc_type is None:
            with open(self._tmp[1], "wb") as f:
                f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, len(self.offsets) - 1))
                f.write(np.asarray(self.offsets, dtype=np.int64).tobytes())
            os.replace(self._tmp[0], self.bin_path)
            os.replace(self._tmp[1], self.idx_path)
        else:
            for path in self._tmp:
                path.unlink(missing_ok=True)


class IndexedDataset:
    """Read-only view of PREFIX.bin/.idx: `ds[d]` is document d's tokens (a memmap slice, no copy)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        bin_path, idx_path = data_paths(prefix)
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise DataError(f"{path} does not exist: prepare the data with "
                                f"`glm-prep --input FILE... --output-prefix {prefix}`")
        self.dtype, num_docs = self._read_header(idx_path)
        expected = HEADER.size + 8 * (num_docs + 1)
        if idx_path.stat().st_size != expected:
            raise DataError(f"{idx_path} is {idx_path.stat().st_size} bytes but its header promises {num_docs} "
                            f"documents ({expected} bytes): the file is truncated or corrupted; rerun glm-prep")
        self.offsets = np.memmap(idx_path, dtype=np.int64, mode="r", offset=HEADER.size, shape=(num_docs + 1,))
        if self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0):
            raise DataError(f"{idx_path} has document offsets that do not start at 0 and rise: the file is "
                            f"corrupted; rerun glm-prep")
        self.num_tokens = int(self.offsets[-1])
        size = bin_path.stat().st_size
        if size != self.num_tokens * self.dtype.itemsize:
            raise DataError(f"{bin_path} is {size} bytes but {idx_path} indexes {self.num_tokens} tokens of "
                            f"{self.dtype} ({self.num_tokens * self.dtype.itemsize} bytes): the .bin is truncated "
                            f"or belongs to another .idx; rerun glm-prep")
        # np.memmap refuses a zero-length map; an empty corpus is an empty array.
        self.tokens: np.ndarray = (np.memmap(bin_path, dtype=self.dtype, mode="r") if self.num_tokens
                                   else np.zeros(0, dtype=self.dtype))

    @staticmethod
    def _read_header(idx_path: Path) -> tuple[np.dtype, int]:
        with open(idx_path, "rb") as f:
            raw = f.read(HEADER.size)
        if len(raw) < HEADER.size or raw[:len(MAGIC)] != MAGIC:
            raise DataError(f"{idx_path} is not a glm-prep index (wrong magic): prepare the data with glm-prep")
        _, version, code, num_docs = HEADER.unpack(raw)
        if version != VERSION:
            raise DataError(f"{idx_path} has format version {version}; this trainer reads version {VERSION}: "
                            f"rerun glm-prep")
        if code not in DTYPES:
            raise DataError(f"{idx_path} declares an unknown token dtype code {code}: the file is corrupted; "
                            f"rerun glm-prep")
        return DTYPES[code], num_docs

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d]: self.offsets[d + 1]]

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)
