"""Weighted mixing of datasets, deterministic in (seed, global sample index).

With sample shares q_c (sum 1), every block of BLOCK consecutive global indices holds exactly
count_c = round(q_c * BLOCK) samples of dataset c (largest remainder, so the counts sum to BLOCK), in an
order that is a permutation seeded by (seed, block). Global index i = b * BLOCK + r reads dataset
c = layout_b[r] at its own index b * count_c + (how many of c precede r in block b): each dataset is
read in its own order without gaps or repeats, and sample i depends on nothing but (seed, i), so the
stream is the same at every data-parallel size and after a resume.

Shares: weights w_c normalised ("samples"), or, to share tokens, q_c proportional to w_c / t_c with t_c
the mean corpus tokens per sample of dataset c ("tokens": GLM-130B's 5% of tokens of instruction data).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from trainer.errors import ConfigError

BLOCK = 1000
"""Global samples per mixing block: each dataset's count in a block is its share rounded to 1/BLOCK."""
MIX_STREAM = 0x6D6978  # separates the mixing generator from the data orders seeded by (seed, split, epoch)


def sample_shares(weights: Sequence[float], mean_tokens: Sequence[float], unit: str) -> np.ndarray:
    """q_c: w_c / sum(w) for unit "samples"; (w_c / t_c) / sum(w / t) for unit "tokens".  # [C]"""
    w = np.asarray(weights, dtype=np.float64)
    if unit == "tokens":
        w = w / np.maximum(np.asarray(mean_tokens, dtype=np.float64), 1.0)
    return w / w.sum()


def block_counts(shares: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Largest-remainder rounding of shares * block: integers summing to block, each within 1 of the exact
    value. A dataset whose share rounds to no sample at all is refused.  # [C]"""
    exact = shares * block
    counts = np.floor(exact).astype(np.int64)
    remainders = exact - counts
    counts[np.argsort(-remainders, kind="stable")[: block - counts.sum()]] += 1
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ConfigError(f"data.datasets[{int(empty[0])}] gets a share of {shares[empty[0]]:.2e} of the samples, "
                          f"less than one in {block}: raise its weight or drop it")
    return counts


def component_seed(seed: int, component: int) -> int:
    """The seed of dataset `component` of a mixture, so two datasets never share orders or draws."""
    return int(np.random.SeedSequence([seed % 2 ** 64, MIX_STREAM, component]).generate_state(1, np.uint64)[0])


class MixtureDataset:
    """`ds[i]` is global sample i of the mixture (module docstring); `locate(i)` says which dataset and index."""

    def __init__(self, components: list, shares: np.ndarray, seed: int, block: int = BLOCK):
        self.components, self.shares, self.seed, self.block = components, shares, seed, block
        self.tokenizer = components[0].tokenizer
        self.counts = block_counts(shares, block)  # [C]
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return sum(len(c) for c in self.components)

    def layout(self, block_number: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each place [BLOCK], rank of the place among its dataset's places [BLOCK]) of one block."""
        if block_number not in self._layouts:
            if len(self._layouts) >= 2:  # a batch spans at most two blocks
                self._layouts.pop(min(self._layouts))
            rng = np.random.default_rng([self.seed % 2 ** 64, MIX_STREAM, block_number])
            component = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))  # [BLOCK]
            order = np.argsort(component, kind="stable")  # places grouped by dataset, ascending within each
            rank = np.empty(self.block, dtype=np.int64)
            rank[order] = np.arange(self.block) - np.repeat(np.cumsum(self.counts) - self.counts, self.counts)
            self._layouts[block_number] = (component, rank)
        return self._layouts[block_number]

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset c, its index) of global sample `index`."""
        if index < 0:
            raise IndexError(f"sample index {index} is negative")
        block_number, place = divmod(index, self.block)
        component, rank = self.layout(block_number)
        c = int(component[place])
        return c, block_number * int(self.counts[c]) + int(rank[place])

    def __getitem__(self, index: int) -> dict:
        c, local = self.locate(index)
        return self.components[c][local]

    def sample_length(self, index: int) -> int:
        c, local = self.locate(index)
        return self.components[c].sample_length(local)
