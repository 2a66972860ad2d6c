"""A split's sequences read in a seeded epoch order: the sample of any global index.

Sample i (a global index over every data-parallel rank) is epoch e = i // N of the N sequences of the
split, at place i % N of that epoch's order (a permutation seeded by (seed, split, e)), blank-infilled
with the generator sample_rng(seed, i). Any i works: the data wraps around and never runs out.
GLMDataset reads blank-infilling texts; InstructionDataset (trainer/data/instruction.py) reads records in the
same order. trainer/data/dataset.py builds either from the config.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from trainer.data.blank_infilling import BlankInfilling, sample_rng
from trainer.data.indexed import IndexedDataset
from trainer.data.tokenizer import GLMTokenizer

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid")


def _first_rank() -> bool:
    """Global rank 0 (RANK as every launcher sets it), or a process run on its own: the one that logs data events."""
    return os.environ.get("RANK", "0") == "0"


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
