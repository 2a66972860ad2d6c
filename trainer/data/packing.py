"""Training sequences (rows) from samples: one sample per row, or several whole samples packed end to end.

A row of seq_length slots holds samples one after another, each exactly as the sample datasets build it
([CLS], Part A, Part B: position ids and block position ids start again at 0 in each), then padding. Beside
the token arrays a row carries two integers per slot for the model's mask (trainer/model/mask.py):
`segment_start` (where the slot's sample starts) and `segment_sep` (where that sample's Part A ends); the
padding after the last sample is a segment of its own with an empty Part A. `tokens` counts the real ones.

Packing (data.packing: true). The global sample stream (dataset index 0, 1, 2, ...: every epoch and every
mixture component already in it) is cut into windows of W = data.packing_window consecutive samples (one
epoch, for a split of fewer). Window w packs its samples (those window w - 1 has not taken) by best-fit
decreasing: longest first, each into the row with the least room that still fits it, else into a new row.
Then every row less full than PACKED_FILL, emptiest first, is topped up from window w + 1: the longest of its
samples that fits the room, again and again; those samples are taken from window w + 1. So no sample is
trained later than its own window (some one window early), and every sample is used once. The rows of a
window are shuffled by a generator seeded with (seed, window). So row k is a pure function of (seed, k) and the data
config: the same at every data-parallel size and after a resume. Finding the window of row k scans the
windows before it (sample lengths only, from their span draws: no sample is built), once per process; a
checkpoint keeps the scan state at its row (`position`), so a resumed process starts the scan there.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import asdict
from typing import Optional, Protocol

import numpy as np

from trainer.data.config import DataConfig
from trainer.data.dataset import build_dataset
from trainer.data.tokenizer import GLMTokenizer

ARRAY_KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "block_position_ids")
PACKED_FILL = 0.95
"""A packed row less full than this after its window is packed is topped up with samples of the next window."""
PLAN_VERSION = 3
"""Bumped whenever the packing rules change, so that saved positions of the old rules are not used."""
NONE_TAKEN = np.empty(0, dtype=np.int64)
KEPT_WINDOWS = 16
"""Windows whose scan state a process keeps (training reads rows in order; an older row rescans from 0)."""
PACK_STREAM = 0x7061636B  # separates the row-order generator from every other stream seeded by (seed, ...)


class SampleDataset(Protocol):
    tokenizer: GLMTokenizer

    def __getitem__(self, index: int) -> dict: ...

    def sample_length(self, index: int) -> int: ...


def pack(samples: list[dict], seq_length: int, pad_id: int) -> dict:
    """One row: the samples end to end (each its first `length` slots), then padding (module docstring).
    Every array [seq_length] int64; `tokens` (real slots) and `starts` (each sample's first slot) besides."""
    row = {key: np.full(seq_length, pad_id if key in ("input_ids", "labels") else 0, dtype=np.int64)
           for key in ARRAY_KEYS}
    segment_start, segment_sep = np.empty(seq_length, dtype=np.int64), np.empty(seq_length, dtype=np.int64)
    start, starts = 0, []
    for sample in samples:
        length = int(sample["length"])
        if start + length > seq_length:
            raise ValueError(f"samples of {start + length} tokens do not fit a row of {seq_length}")
        for key in ARRAY_KEYS:
            row[key][start:start + length] = sample[key][:length]
        segment_start[start:start + length] = start
        segment_sep[start:start + length] = start + int(sample["sep"])
        starts.append(start)
        start += length
    segment_start[start:] = segment_sep[start:] = start  # the padding: a segment with an empty Part A
    row.update(segment_start=segment_start, segment_sep=segment_sep, tokens=start, starts=starts)
    return row


def best_fit_decreasing(lengths: np.ndarray, capacity: int, first: int = 0) -> list[list[int]]:
    """Bins of item positions: the first `first` items, then the others, each group longest first (ties by
    position), each item into the fullest bin it fits, else a new bin. Every length must be <= capacity."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free slots, bin number), sorted
    order = [*np.argsort(-lengths[:first], kind="stable"), *(first + np.argsort(-lengths[first:], kind="stable"))]
    for item in map(int, order):
        place = bisect.bisect_left(room, (int(lengths[item]), -1))
        if place == len(room):
            bins.append([item])
            free, number = capacity - int(lengths[item]), len(bins) - 1
        else:
            free, number = room.pop(place)
            bins[number].append(item)
            free -= int(lengths[item])
        bisect.insort(room, (free, number))
    return bins


class OneSamplePerRow:
    """Row k = global sample k alone, padded (data.packing: false)."""

    def __init__(self, samples: SampleDataset, seq_length: int):
        self.samples, self.seq_length, self.tokenizer = samples, seq_length, samples.tokenizer

    def members(self, row: int) -> list[int]:
        """The global sample indices of `row`, in row order."""
        return [row]

    def real_tokens(self, row: int) -> int:
        return self.samples.sample_length(row)

    def __getitem__(self, row: int) -> dict:
        return pack([self.samples[row]], self.seq_length, self.tokenizer.pad_id)

    def position(self, row: int) -> Optional[dict]:
        """What a resumed process needs to find `row` quickly: nothing here (row k is sample k)."""
        return None

    def restore(self, position: Optional[dict]) -> None:
        """Start from a `position` saved by a run of the same data config (a no-op here)."""


class PackedSequences(OneSamplePerRow):
    """Row k = the samples the windowed best-fit packing puts in row k (module docstring)."""

    def __init__(self, samples: SampleDataset, seq_length: int, seed: int, window: int, fingerprint: str = ""):
        super().__init__(samples, seq_length)
        self.seed, self.window, self.fingerprint = seed, window, fingerprint
        self._rows: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}  # recent windows: (members, fills)
        self._lengths: dict[int, np.ndarray] = {}  # recent windows: the length of each of their samples
        self._scan_from(0, 0, NONE_TAKEN)

    def _scan_from(self, window: int, first_row: int, taken: np.ndarray) -> None:
        """Forget the scan and start it again at `window`, which begins at `first_row`, `taken` of its samples
        already in the rows of the window before."""
        self._base = window  # the window that entry 0 of the two lists below describes
        self._first_row = [first_row]  # [w - base]: rows emitted before window w (one entry more than scanned)
        self._taken = [taken]  # [w - base]: window w's samples that window w - 1 took, sorted
        self._rows.clear()

    def _window_lengths(self, w: int) -> np.ndarray:
        """The lengths of window w's samples, [W], kept for the two windows a pass reads."""
        if w not in self._lengths:
            if len(self._lengths) >= 3:
                self._lengths.pop(min(self._lengths))
            first = w * self.window
            self._lengths[w] = np.array([self.samples.sample_length(i) for i in range(first, first + self.window)],
                                        dtype=np.int64)
        return self._lengths[w]

    def _pack_window(self, w: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(members of each row of window w, their real tokens, the samples of window w + 1 they took)."""
        first = w * self.window
        own = np.setdiff1d(np.arange(first, first + self.window), self._taken[w - self._base])  # [n]
        lengths = self._window_lengths(w)[own - first]  # [n]
        bins = best_fit_decreasing(lengths, self.seq_length)
        rows, fills = [own[b].tolist() for b in bins], [int(lengths[b].sum()) for b in bins]
        taken = self._top_up(rows, fills, w + 1)
        order = np.random.default_rng([self.seed % 2 ** 64, PACK_STREAM, w]).permutation(len(rows))
        return ([np.sort(rows[i]) for i in order], np.array(fills, dtype=np.int64)[order],
                np.array(sorted(taken), dtype=np.int64))

    def _top_up(self, rows: list[list[int]], fills: list[int], lookahead: int) -> list[int]:
        """Fill the rows less full than PACKED_FILL, emptiest first, with the longest samples of window
        `lookahead` that fit their room (in place); returns the samples taken."""
        first = lookahead * self.window
        lengths = self._window_lengths(lookahead)
        available = sorted(zip(lengths.tolist(), range(first, first + self.window)))  # (length, sample)
        taken = []
        for number in sorted(range(len(rows)), key=lambda n: (fills[n], n)):
            while available and fills[number] < PACKED_FILL * self.seq_length:
                place = bisect.bisect_right(available, (self.seq_length - fills[number], first + self.window)) - 1
                if place < 0:
                    break
                length, sample = available.pop(place)
                rows[number].append(sample)
                fills[number] += length
                taken.append(sample)
        return taken

    def _window_rows(self, w: int) -> tuple[list[np.ndarray], np.ndarray]:
        if w not in self._rows:
            members, fills, _ = self._pack_window(w)
            self._remember(w, members, fills)
        return self._rows[w]

    def _remember(self, w: int, members: list[np.ndarray], fills: np.ndarray) -> None:
        """Keep window w's rows and one other window's, the latest (a step's rows span at most a few
        windows; a window let go is packed again when asked for)."""
        self._rows[w] = (members, fills)
        while len(self._rows) > 2:
            self._rows.pop(min(k for k in self._rows if k != w))

    def _locate(self, row: int) -> tuple[int, int]:
        """(window, place in that window's rows) of `row`, scanning windows as far as needed."""
        if row < 0:
            raise IndexError(f"row index {row} is negative")
        if row < self._first_row[0]:  # before the windows kept (or a restored position): scan from the start
            self._scan_from(0, 0, NONE_TAKEN)
        while self._first_row[-1] <= row:
            w = self._base + len(self._first_row) - 1
            members, fills, taken = self._pack_window(w)
            self._remember(w, members, fills)
            self._first_row.append(self._first_row[-1] + len(members))
            self._taken.append(taken)
            if len(self._taken) > KEPT_WINDOWS:  # a long run's scan state stays bounded
                del self._first_row[0], self._taken[0]
                self._base += 1
        i = bisect.bisect_right(self._first_row, row) - 1
        return self._base + i, row - self._first_row[i]

    def members(self, row: int) -> list[int]:
        w, place = self._locate(row)
        return self._window_rows(w)[0][place].tolist()

    def real_tokens(self, row: int) -> int:
        w, place = self._locate(row)
        return int(self._window_rows(w)[1][place])

    def __getitem__(self, row: int) -> dict:
        return pack([self.samples[i] for i in self.members(row)], self.seq_length, self.tokenizer.pad_id)

    def position(self, row: int) -> dict:
        """The scan state at the window holding `row` (JSON-serialisable), tagged with the data config."""
        w, _ = self._locate(row)
        i = w - self._base
        return {"fingerprint": self.fingerprint, "window": w, "first_row": self._first_row[i],
                "taken": self._taken[i].tolist()}

    def restore(self, position: Optional[dict]) -> None:
        """Resume the scan at a saved position, if it was made with this data config (else scan from 0)."""
        if position and position.get("fingerprint") == self.fingerprint:
            self._scan_from(int(position["window"]), int(position["first_row"]),
                            np.array(position["taken"], dtype=np.int64))


def build_sequences(data: DataConfig, seed: int, split: str = "train") -> OneSamplePerRow:
    """The rows of `split` that training (and validation) reads: packed when data.packing is set."""
    samples = build_dataset(data, seed, split)
    if data.packing:
        window = min(data.packing_window, len(samples))  # a split smaller than a window: one epoch a window
        return PackedSequences(samples, data.seq_length, seed, window,
                               fingerprint(data, seed, split, len(samples)))
    return OneSamplePerRow(samples, data.seq_length)


def fingerprint(data: DataConfig, seed: int, split: str, sequences: int) -> str:
    """What the packing plan depends on (the data config, the seed, the split, the corpus's sequence count,
    this file's rules), hashed: a saved position is used only by a run with the same one."""
    inputs = json.dumps([asdict(data), seed, split, sequences, PACKED_FILL, PLAN_VERSION], sort_keys=True,
                        default=str)
    return hashlib.sha256(inputs.encode()).hexdigest()[:16]
