"""Training sequences from a prepared corpus, the sample for any global index, and batches.

Documents are kept apart: a document of m tokens becomes p = ceil(m / n) consecutive texts, where
n = text_length(data) is the longest text whose sample fits seq_length in every mode: of near-equal length
(text j = tokens [floor(j m / p), floor((j + 1) m / p))) one sample per row, or, with packing, p - 1 texts of
n tokens and the remainder. No text mixes two documents.

Sample i (a global index over every data-parallel rank) is epoch e = i // N of the N sequences of the
split, at place i % N of that epoch's order (a permutation seeded by (seed, split, e)), blank-infilled
with the generator sample_rng(seed, i). Any i works: the data wraps around and never runs out.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from trainer.data.blank_infilling import BlankInfilling, sample_rng, text_length
from trainer.data.config import DataConfig
from trainer.data.corpus import embedded_corpus
from trainer.data.indexed import IndexedDataset
from trainer.data.mixture import MixtureDataset, component_seed, sample_shares
from trainer.data.tokenizer import GLMTokenizer, load_tokenizer
from trainer.errors import DataError

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid")
CHECKED_TOKENS = 1 << 20
"""Tokens at the start of the corpus compared against the tokenizer's vocabulary when opening it."""


def resolve_paths(data: DataConfig) -> tuple[str, Path]:
    """(prefix, tokenizer path): data.path (of a mixture: its first dataset) or the embedded corpus;
    data.tokenizer or PREFIX.tokenizer.json."""
    prefix = data.path or (data.datasets[0]["path"] if data.datasets else "") or str(embedded_corpus())
    return prefix, Path(data.tokenizer or f"{prefix}.tokenizer.json")


def open_corpus(data: DataConfig) -> tuple[IndexedDataset, GLMTokenizer]:
    """The prepared corpus and its tokenizer, checked against each other."""
    prefix, tokenizer_path = resolve_paths(data)
    indexed, tokenizer = IndexedDataset(prefix), load_tokenizer(tokenizer_path)
    head = indexed.tokens[:CHECKED_TOKENS]
    if head.size and int(head.max()) >= tokenizer.vocab_size:
        raise DataError(f"{prefix}.bin holds token id {int(head.max())} but the tokenizer {tokenizer_path} has only "
                        f"{tokenizer.vocab_size} ids: use the tokenizer the data was prepared with")
    return indexed, tokenizer


def check_data_files(data: DataConfig) -> int:
    """Open the data, the tokenizer and the sample layout as training will; returns the vocabulary size."""
    from trainer.data.instruction import is_instruction_prefix  # instruction.py subclasses GLMDataset

    if data.datasets or is_instruction_prefix(resolve_paths(data)[0]):
        return build_dataset(data, 0).tokenizer.vocab_size
    _, tokenizer = open_corpus(data)
    text_length(data)
    return tokenizer.vocab_size


def cut_sequences(doc_lengths: np.ndarray, offsets: np.ndarray, n: int,
                  equal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) in stream coordinates of the texts: each document of m tokens cut into p = ceil(m / n)
    pieces of length <= n, near-equal (`equal`: text j = [floor(j m / p), floor((j + 1) m / p))) or, for
    packing, p - 1 pieces of n and the remainder last (short texts fill the rows full pieces leave open).
    Empty documents give none."""
    m = doc_lengths.astype(np.int64)
    pieces = -(-m // n)  # ceil(m / n)
    doc = np.repeat(np.arange(len(m)), pieces)  # [S] the document of each text
    j = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # [S] piece number within it
    base, m_doc, p_doc = np.asarray(offsets[:-1])[doc], m[doc], pieces[doc]
    if equal:
        return base + j * m_doc // p_doc, base + (j + 1) * m_doc // p_doc
    return base + j * n, base + np.minimum((j + 1) * n, m_doc)


def _first_rank() -> bool:
    """Rank 0 of a started process group, or a process without one: the one that logs data events."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


class GLMDataset:
    """`ds[i]` is the blank-infilling sample of global index i >= 0; `len(ds)` sequences per epoch."""

    def __init__(self, indexed: IndexedDataset, tokenizer: GLMTokenizer, infilling: BlankInfilling,
                 starts: np.ndarray, ends: np.ndarray, seed: int, split: str):
        self.indexed, self.tokenizer, self.infilling = indexed, tokenizer, infilling
        self.starts, self.ends, self.seed, self.split = starts, ends, seed, split
        self._orders: dict[int, np.ndarray] = {}
        self._announced = False  # the first wrap-around is logged, once (a small dataset wraps every few steps)

    def __len__(self) -> int:
        return len(self.starts)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of the split's sequences used in `epoch`, a function of (seed, split, epoch)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng([self.seed % 2 ** 64, SPLITS.index(self.split), epoch])
            self._orders[epoch] = rng.permutation(len(self))
        return self._orders[epoch]

    def sequence_number(self, index: int, announce: bool = True) -> int:
        """The sequence of the split that global sample `index` reads; the first sample read of epoch 1 logs
        that the data repeats from there, on rank 0 (`announce` False: a look ahead, e.g. the packer reading
        lengths, does not)."""
        if index < 0:
            raise IndexError(f"sample index {index} is negative")
        epoch, place = divmod(index, len(self))
        if announce and epoch == 1 and not self._announced and _first_rank():
            self._announced = True
            logger.info("data (%s): all %d sequences read once; from sample %d on they repeat, in a new order each "
                        "epoch", self.split, len(self), index)
        return int(self.epoch_order(epoch)[place])

    def sequence(self, index: int, announce: bool = True) -> np.ndarray:
        """The text tokens of global sample `index` (a zero-copy view of the corpus)."""
        s = self.sequence_number(index, announce)
        return self.indexed.tokens[self.starts[s]: self.ends[s]]

    def source_tokens(self) -> np.ndarray:
        """Corpus tokens of each sequence.  # [N]"""
        return self.ends - self.starts

    def __getitem__(self, index: int) -> dict:
        return self.infilling(self.sequence(index), sample_rng(self.seed, index))

    def sample_length(self, index: int) -> int:
        """`self[index]["length"]`, from the sample's span draws alone (what the packer reads)."""
        return self.infilling.length(self.sequence(index, announce=False), sample_rng(self.seed, index))


def build_dataset(data: DataConfig, seed: int, split: str = "train"):
    """The dataset of `split`: "train", or "valid" = the last data.valid_fraction of the sequences
    (in corpus order, so mostly whole documents that training never sees). A GLMDataset, an
    InstructionDataset for a `glm-prep --instructions` prefix, or a MixtureDataset of data.datasets."""
    if split not in SPLITS:
        raise DataError(f"unknown data split {split!r}: use one of {', '.join(SPLITS)}")
    if data.datasets:
        return build_mixture(data, seed, split)
    from trainer.data.instruction import build_instruction_dataset, is_instruction_prefix  # subclasses GLMDataset

    indexed, tokenizer = open_corpus(data)
    if is_instruction_prefix(indexed.prefix):
        return build_instruction_dataset(indexed, tokenizer, data, seed, split)
    infilling = BlankInfilling(data, tokenizer)
    starts, ends = cut_sequences(indexed.doc_lengths, indexed.offsets, infilling.text_length, equal=not data.packing)
    held_out = 0 if data.valid_fraction == 0 else max(1, round(data.valid_fraction * len(starts)))
    if split == "valid" and held_out == 0:
        raise DataError("a validation split was requested but data.valid_fraction is 0: set it, e.g. 0.05")
    if len(starts) - held_out < 1:
        raise DataError(f"{indexed.prefix} holds {len(starts)} sequence(s), too few for training"
                        f"{' after the validation split' if held_out else ''}: give more text")
    cut = len(starts) - held_out
    chosen = slice(0, cut) if split == "train" else slice(cut, None)
    return GLMDataset(indexed, tokenizer, infilling, starts[chosen], ends[chosen], seed, split)


def build_mixture(data: DataConfig, seed: int, split: str) -> MixtureDataset:
    """data.datasets mixed by weight (trainer/data/mixture.py), every one read with the same tokenizer."""
    tokenizer_path = resolve_paths(data)[1]
    components = []
    for c, entry in enumerate(data.datasets):
        own = Path(f"{entry['path'] or embedded_corpus()}.tokenizer.json")
        if own.is_file() and own.resolve() != tokenizer_path.resolve() and \
                load_tokenizer(own).to_str() != load_tokenizer(tokenizer_path).to_str():
            raise DataError(f"data.datasets[{c}] ({entry['path'] or 'embedded corpus'}) was prepared with {own}, not "
                            f"the mixture's tokenizer {tokenizer_path}: prepare every dataset with one tokenizer "
                            f"(glm-prep --tokenizer FILE)")
        single = replace(data, path=entry["path"], tokenizer=str(tokenizer_path), datasets=[],
                         modes=entry.get("modes", data.modes), seq_length=entry.get("seq_length", data.seq_length))
        components.append(build_dataset(single, component_seed(seed, c), split))
    shares = sample_shares([e["weight"] for e in data.datasets],
                           [float(np.mean(c.source_tokens())) for c in components], data.mixture_unit)
    return MixtureDataset(components, shares, seed)


def micro_batch_indices(consumed_samples: int, micro_step: int, dp_rank: int, dp_size: int,
                        micro_batch_size: int) -> list[int]:
    """Global indices of one micro-batch: consumed + (micro_step * dp + dp_rank) * mbs + [0, mbs).
    The micro-batches of a step tile [consumed, consumed + steps * dp * mbs) whatever dp is."""
    first = consumed_samples + (micro_step * dp_size + dp_rank) * micro_batch_size
    return list(range(first, first + micro_batch_size))


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples or rows: every array key -> int64 [b, s], every integer key (`sep`, `length`, `tokens`)
    -> int64 [b]; other keys (a row's list of sample starts) are left out."""
    batch = {}
    for key, value in items[0].items():
        if isinstance(value, np.ndarray):
            batch[key] = torch.from_numpy(np.stack([item[key] for item in items]).astype(np.int64))
        elif isinstance(value, (int, np.integer)):
            batch[key] = torch.tensor([int(item[key]) for item in items], dtype=torch.int64)
    return batch
