"""GLM autoregressive blank infilling (GLM-SPEC section 1): one text -> one training sample.

For a text x of n tokens and blanks (spans) s_1 .. s_k in text order:
    Part A = [CLS] + x with every span replaced by one mask token         (|Part A| = sep = n + 1 - sum|s| + k)
    Part B = for each span in a random order: input [sop] + s, target s + [eop]   (|Part B| = sum|s| + k)
so a sample holds n + 1 + 2k tokens (its `length`). Ids of Part A: position 0..sep-1, block position 0. Ids of a
Part B span: position = its mask's position in Part A, block position 1..|s|+1. The loss covers Part B.

Modes: [MASK] spans of Poisson(lambda) length covering >= mask_ratio of the text; [sMASK] whole
sentences covering >= mask_ratio; [gMASK] one suffix of length in [gmask_ratio_min, gmask_ratio_max] * n;
causal, GLM-4's objective: the whole text after the [gMASK] <sop> prefix, left to right. A causal sample is
Part A = [gMASK] alone (no [CLS]: the mask is causal) and one Part B span [sop] + x predicted as
x + <|endoftext|> (the end of the document, as GLM-4 ends its texts): n + 2 tokens, positions 0, block
positions 0, 1, .., n + 1, so rope_1d sees 0, 1, .., n + 1.
"""
from __future__ import annotations

import math

import numpy as np

from trainer.data.config import BLANK_MODES, MODES, DataConfig
from trainer.data.tokenizer import GLMTokenizer
from trainer.errors import DataError

MAX_SPAN_LENGTH = 39
"""[MASK] span lengths are Poisson(lambda) truncated to 1..39 (the reference code's table)."""
SENTENCE_ENDS = ".?!;:\u3002\uff1f\uff01\uff1b\uff1a\n"
"""A token whose text ends (trailing spaces and tabs ignored) with one of these ends a sentence."""
_EPS = 1e-9  # 0.15 * 20 = 3.0000000000000004: keep ceil/floor from stepping past an exact product


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index`: a pure function of (seed, index), so a sample is the same at
    any data-parallel size and after a resume."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed % 2 ** 64, index])))


def covered_target(n: int, ratio: float) -> int:
    """Tokens [MASK] and [sMASK] must cover: ceil(ratio * n), at least 1 (so the fraction is >= ratio)."""
    return max(1, math.ceil(ratio * n - _EPS))


def max_blanks(n: int, data: DataConfig) -> int:
    """The most blanks a text of n tokens can get in the configured modes. Spans are >= 1 token and
    sampling stops once covered_target is reached, so k <= covered_target; [gMASK] has one blank."""
    active = {mode for mode, weight in data.modes.items() if weight > 0}
    return covered_target(n, data.mask_ratio) if active & {"mask", "smask"} else 1


def text_length(data: DataConfig) -> int:
    """The largest n with n + 1 + 2 * max_blanks(n) <= seq_length: every text of n tokens or fewer fits
    seq_length in every configured mode."""
    # n + 1 + 2 * max_blanks(n) grows with n: bisect for the largest n that fits (a loop over n would take
    # minutes at a long seq_length).
    low, high = 0, data.seq_length - 3  # low fits (or is 0), the answer is in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if middle + 1 + 2 * max_blanks(middle, data) <= data.seq_length:
            low = middle
        else:
            high = middle - 1
    n = low
    if n < 1:
        raise DataError(f"data.seq_length={data.seq_length} is too short for one blank: a sample needs the start "
                        f"token, a mask, sop, eop and at least one text token; use data.seq_length >= 8")
    return n


def poisson_span_weights(lam: float) -> np.ndarray:
    """P(length = l) proportional to Poisson(l; lam) = e^-lam lam^l / l!, for l = 1..39.  # [39]"""
    lengths = np.arange(1, MAX_SPAN_LENGTH + 1)
    log_pmf = -lam + lengths * math.log(lam) - np.array([math.lgamma(l + 1) for l in lengths])
    weights = np.exp(log_pmf - log_pmf.max())
    return weights / weights.sum()


def mask_spans(n: int, rng: np.random.Generator, ratio: float, weights: np.ndarray) -> list[tuple[int, int]]:
    """[MASK]: Poisson lengths drawn until they cover covered_target(n), placed at random in text order
    with at least one unmasked token between two spans. Returns [(start, end)] sorted."""
    target = covered_target(n, ratio)
    draws = rng.choice(len(weights), size=target, p=weights) + 1
    k = int(np.searchsorted(np.cumsum(draws), target)) + 1  # first prefix that covers the target
    lengths = [int(l) for l in draws[:k]]
    # The last span may overshoot the text: drop spans that leave it no room, then clip it to the room.
    while len(lengths) > 1 and sum(lengths[:-1]) + len(lengths) - 1 >= n:
        lengths.pop()
    lengths[-1] = min(lengths[-1], n - sum(lengths[:-1]) - (len(lengths) - 1))
    lengths = [lengths[i] for i in rng.permutation(len(lengths))]
    free = n - sum(lengths) - (len(lengths) - 1)  # unmasked tokens beyond the mandatory separators
    places = np.sort(rng.integers(0, free + 1, size=len(lengths)))
    spans, start = [], 0
    for place, length in zip(places, lengths):
        begin = int(place) + start
        spans.append((begin, begin + length))
        start += length + 1
    return spans


def sentence_spans(is_end: np.ndarray, rng: np.random.Generator, ratio: float) -> list[tuple[int, int]]:
    """[sMASK]: cut the text after every run of sentence-end tokens (so "exits." + "\\n\\n" stays one
    sentence), take whole sentences in a random order until they cover covered_target(n).
    `is_end` [n] marks the sentence-end tokens. Returns sorted spans."""
    n = len(is_end)
    run_ends = is_end & ~np.append(is_end[1:], False)  # [n] last token of a run of end tokens
    cuts = np.unique(np.concatenate([[0], np.flatnonzero(run_ends) + 1, [n]]))
    sentences = list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
    target, covered, chosen = covered_target(n, ratio), 0, []
    for i in rng.permutation(len(sentences)):
        chosen.append(sentences[i])
        covered += sentences[i][1] - sentences[i][0]
        if covered >= target:
            break
    return sorted(chosen)


def gmask_span(n: int, rng: np.random.Generator, ratio_min: float, ratio_max: float) -> list[tuple[int, int]]:
    """[gMASK]: one suffix of L tokens, L uniform over the integers in [ratio_min * n, ratio_max * n]
    (when that interval holds no integer: ceil(ratio_min * n)), 1 <= L <= n."""
    low = max(1, math.ceil(ratio_min * n - _EPS))
    high = min(n, math.floor(ratio_max * n + _EPS))
    length = int(rng.integers(low, high + 1)) if low <= high else min(low, n)
    return [(n - length, n)]


def assemble(tokens: np.ndarray, spans: list[tuple[int, int]], mask_id: int, order: np.ndarray,
             tokenizer: GLMTokenizer, seq_length: int, causal: bool = False) -> dict:
    """Build Part A and Part B (Part B spans in `order`) and pad every array to seq_length. causal: Part A
    without the [CLS] opening, the span predicted up to <|endoftext|> instead of [eop]."""
    opening = [] if causal else [tokenizer.require_cls("blank infilling")]
    end_id = tokenizer.eot_id if causal else tokenizer.eop_id
    part_a, mask_positions, previous = [np.array(opening, dtype=np.int64)], [], 0
    a_length = len(opening)
    for start, end in spans:
        part_a += [tokens[previous:start], np.array([mask_id])]
        a_length += start - previous
        mask_positions.append(a_length)
        a_length += 1
        previous = end
    part_a.append(tokens[previous:])
    inputs = [np.concatenate(part_a)]
    sep = len(inputs[0])
    labels = [np.full(sep, tokenizer.pad_id)]
    positions, blocks = [np.arange(sep)], [np.zeros(sep, dtype=np.int64)]
    for j in order:
        start, end = spans[j]
        inputs.append(np.concatenate([[tokenizer.sop_id], tokens[start:end]]))
        labels.append(np.concatenate([tokens[start:end], [end_id]]))
        positions.append(np.full(end - start + 1, mask_positions[j]))
        blocks.append(np.arange(1, end - start + 2))
    total = sep + sum(end - start + 1 for start, end in spans)
    if total > seq_length:
        raise DataError(f"a sample of {len(tokens)} text tokens and {len(spans)} blanks needs {total} positions "
                        f"but data.seq_length={seq_length}: raise data.seq_length or cut texts with text_length()")
    sample = {"input_ids": inputs, "labels": labels, "loss_mask": [np.zeros(sep), np.ones(total - sep)],
              "position_ids": positions, "block_position_ids": blocks}
    pad_values = {"input_ids": tokenizer.pad_id, "labels": tokenizer.pad_id}
    for key, parts in sample.items():
        array = np.full(seq_length, pad_values.get(key, 0), dtype=np.int64)
        array[:total] = np.concatenate(parts)
        sample[key] = array
    sample["sep"], sample["length"] = sep, total
    return sample


class BlankInfilling:
    """Turns texts of at most `text_length` tokens into samples, drawing the mode per sample from
    data.modes (the reference draws per batch; per sample keeps a sample a function of (seed, index))."""

    def __init__(self, data: DataConfig, tokenizer: GLMTokenizer):
        self.data, self.tokenizer = data, tokenizer
        self.text_length = text_length(data)
        self.modes = [m for m in MODES if data.modes.get(m, 0) > 0]
        weights = np.array([data.modes[m] for m in self.modes], dtype=np.float64)
        self.mode_probabilities = weights / weights.sum()
        self.span_weights = poisson_span_weights(data.poisson_lambda)
        self.sentence_end = sentence_end_table(tokenizer)
        self.mask_ids = {"mask": tokenizer.mask_id, "smask": tokenizer.smask_id, "gmask": tokenizer.gmask_id,
                         "causal": tokenizer.gmask_id}
        if set(self.modes) - {"causal"}:
            tokenizer.require_cls(f"blank infilling (data.modes {sorted(set(self.modes) - {'causal'})})")

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator, mode: str | None = None) -> dict:
        """One sample from `tokens` [n] (1 <= n <= text_length); `mode` None draws it from data.modes."""
        tokens = np.asarray(tokens, dtype=np.int64)
        mode, spans = self.draw_spans(tokens, rng, mode)
        order = rng.permutation(len(spans))
        return assemble(tokens, spans, self.mask_ids[mode], order, self.tokenizer, self.data.seq_length,
                        causal=mode == "causal")

    def length(self, tokens: np.ndarray, rng: np.random.Generator) -> int:
        """The length n + 1 + 2k (causal: n + 2, no [CLS]) of the sample __call__ makes from the same tokens and
        generator state, from the draws of its spans alone (the packer reads lengths of many samples it has
        not built yet)."""
        mode, spans = self.draw_spans(np.asarray(tokens, dtype=np.int64), rng)
        return len(tokens) + 2 * len(spans) + (0 if mode == "causal" else 1)

    def draw_spans(self, tokens: np.ndarray, rng: np.random.Generator,
                   mode: str | None = None) -> tuple[str, list[tuple[int, int]]]:
        """(mode, the blanks [(start, end)] in text order): the first draws of a sample from `rng`."""
        n = len(tokens)
        if not 1 <= n <= self.text_length:
            raise DataError(f"a text of {n} tokens cannot become a sample: texts must hold 1..{self.text_length} "
                            f"tokens at data.seq_length={self.data.seq_length}")
        if mode is None:
            mode = self.modes[rng.choice(len(self.modes), p=self.mode_probabilities)]
        if mode == "mask":
            spans = mask_spans(n, rng, self.data.mask_ratio, self.span_weights)
        elif mode == "smask":
            spans = sentence_spans(self.sentence_end[tokens], rng, self.data.mask_ratio)
        elif mode == "causal":
            spans = [(0, n)]
        else:
            spans = gmask_span(n, rng, self.data.gmask_ratio_min, self.data.gmask_ratio_max)
        return mode, spans


def sentence_end_table(tokenizer: GLMTokenizer) -> np.ndarray:
    """[vocab_size] bool: True for the tokens that end a sentence (SENTENCE_ENDS; never a special token)."""
    table = np.zeros(tokenizer.vocab_size, dtype=bool)
    for token_id in range(tokenizer.vocab_size):
        if token_id not in tokenizer.special_ids:
            text = tokenizer.decode([token_id]).rstrip(" \t")
            table[token_id] = bool(text) and text[-1] in SENTENCE_ENDS
    return table
