"""Training sequences from a prepared corpus, the sample for any global index, and batches.

Documents are kept apart: a document of m tokens becomes p = ceil(m / n) consecutive texts, where
n = text_length(data) is the longest text whose sample fits seq_length in every mode: of near-equal length
(text j = tokens [floor(j m / p), floor((j + 1) m / p))) one sample per row, or, with packing, p - 1 texts of
n tokens and the remainder. No text mixes two documents.

Sample i is read as trainer/data/sequences.py says (a seeded epoch order over the split's sequences).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from trainer.data.blank_infilling import BlankInfilling, text_length
from trainer.data.config import DataConfig
from trainer.data.corpus import embedded_corpus
from trainer.data.indexed import IndexedDataset
from trainer.data.instruction import build_instruction_dataset, is_instruction_prefix
from trainer.data.mixture import MixtureDataset, component_seed, sample_shares
from trainer.data.sequences import SPLITS, GLMDataset
from trainer.data.tokenizer import GLMTokenizer, load_tokenizer
from trainer.errors import DataError

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


def build_dataset(data: DataConfig, seed: int, split: str = "train"):
    """The dataset of `split`: "train", or "valid" = the last data.valid_fraction of the sequences
    (in corpus order, so mostly whole documents that training never sees). A GLMDataset, an
    InstructionDataset for a `glm-prep --instructions` prefix, or a MixtureDataset of data.datasets."""
    if split not in SPLITS:
        raise DataError(f"unknown data split {split!r}: use one of {', '.join(SPLITS)}")
    if data.datasets:
        return build_mixture(data, seed, split)
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


BATCH_KEYS = ("loss_positions", "num_loss_tokens", "num_tokens")
"""What collate adds about the whole batch (every other key is per row, [b, ...])."""


def collate(items: list[dict]) -> dict[str, torch.Tensor | int]:
    """Stack samples or rows: every array key -> int64 [b, s], every integer key (`sep`, `length`, `tokens`)
    -> int64 [b]; other keys (a row's list of sample starts) are left out. Besides, counted here once on the
    host so that no rank recounts them from device tensors: `loss_positions` int64 [n], the flat indices
    (into b * s) of the n loss tokens in order; `num_loss_tokens` = n and `num_tokens` (the real tokens of
    the rows: `tokens`, or `length` for samples) as ints."""
    batch: dict[str, torch.Tensor | int] = {}
    for key, value in items[0].items():
        if isinstance(value, np.ndarray):
            batch[key] = torch.from_numpy(np.stack([item[key] for item in items]).astype(np.int64))
        elif isinstance(value, (int, np.integer)):
            batch[key] = torch.tensor([int(item[key]) for item in items], dtype=torch.int64)
    loss_mask = np.stack([item["loss_mask"] for item in items])  # [b, s]
    batch["loss_positions"] = torch.from_numpy(np.flatnonzero(loss_mask).astype(np.int64))  # [n]
    batch["num_loss_tokens"] = int(np.count_nonzero(loss_mask))
    real = "tokens" if "tokens" in items[0] else "length"
    batch["num_tokens"] = sum(int(item[real]) for item in items)
    return batch
