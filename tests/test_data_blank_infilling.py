"""Blank infilling (GLM-SPEC section 1): properties over random documents, seeds and modes; the
sequence-length rule. (The attention mask is the model's: tests/test_model_mask.py.)"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data.blank_infilling import (MODES, BlankInfilling, assemble, covered_target,
                                          max_blanks, sample_rng, text_length)
from trainer.data.config import DataConfig
from trainer.data.tokenizer import train_tokenizer
from trainer.errors import DataError

TEXT = ("The assert statement checks a condition. Does it raise? Yes: AssertionError!\n"
        "Loops run; breaks stop them.\n\nSpans, sentences and suffixes are blanks. ") * 20
TOKENIZER = train_tokenizer([TEXT], 400)
ORDINARY = np.array([i for i in range(TOKENIZER.vocab_size) if i not in TOKENIZER.special_ids])
MASK_IDS = {"mask": TOKENIZER.mask_id, "smask": TOKENIZER.smask_id, "gmask": TOKENIZER.gmask_id}


def part_b_spans(sample: dict) -> list[tuple[int, int]]:
    """[(start, end)) of each Part B span (sop .. last target) in sample coordinates."""
    sep, total = sample["sep"], sample["sep"] + int(sample["loss_mask"].sum())
    starts = sep + np.flatnonzero(sample["block_position_ids"][sep:total] == 1)
    return list(zip(starts.tolist(), [*starts[1:].tolist(), total]))


def check_sample(sample: dict, tokens: np.ndarray, mode: str, data: DataConfig) -> None:
    n, s, sep, tok = len(tokens), data.seq_length, sample["sep"], TOKENIZER
    ids, labels, loss_mask = sample["input_ids"], sample["labels"], sample["loss_mask"]
    positions, blocks = sample["position_ids"], sample["block_position_ids"]
    for key in ("input_ids", "labels", "loss_mask", "position_ids", "block_position_ids"):
        assert sample[key].dtype == np.int64 and sample[key].shape == (s,)
    spans = part_b_spans(sample)
    total = sep + int(loss_mask.sum())
    # sep = |Part A|: Part A is [CLS] + text with one mask token per blank (causal: [gMASK] alone),
    # positions 0..sep-1, block 0
    opening, end_id = (0, tok.eot_id) if mode == "causal" else (1, tok.eop_id)
    assert (opening == 0 or ids[0] == tok.cls_id) and sep == n + opening - sum(e - b - 1 for b, e in spans) + len(spans)
    np.testing.assert_array_equal(positions[:sep], np.arange(sep))
    assert not blocks[:sep].any() and not loss_mask[:sep].any()
    mask_positions = np.flatnonzero(np.isin(ids[:sep], list(MASK_IDS.values())))
    mask_id = TOKENIZER.gmask_id if mode == "causal" else MASK_IDS[mode]  # causal: the [gMASK] prefix
    assert set(ids[mask_positions]) == {mask_id} and len(mask_positions) == len(spans)
    # Part B: sop + span, targets span + eop (causal: <|endoftext|>), one position (its mask's), block 1..L+1;
    # loss exactly there
    fills = {}
    for b, e in spans:
        assert ids[b] == tok.sop_id and labels[e - 1] == end_id
        np.testing.assert_array_equal(labels[b:e - 1], ids[b + 1:e])
        np.testing.assert_array_equal(blocks[b:e], np.arange(1, e - b + 1))
        assert len(set(positions[b:e])) == 1 and positions[b] in mask_positions and positions[b] not in fills
        fills[int(positions[b])] = ids[b + 1:e]
    np.testing.assert_array_equal(loss_mask, (np.arange(s) >= sep) & (np.arange(s) < total))
    assert (labels[loss_mask == 0] == tok.pad_id).all() and (ids[total:] == tok.pad_id).all()
    assert not positions[total:].any() and not blocks[total:].any()
    # every blank filled exactly once; Part B put back at the mask positions gives the document
    restored = np.concatenate([fills[p] if p in fills else [ids[p]] for p in range(opening, sep)])
    np.testing.assert_array_equal(restored, tokens)
    masked = sum(len(f) for f in fills.values())
    if mode in ("mask", "smask"):
        assert masked >= data.mask_ratio * n - 1e-9
    if mode == "mask":  # spans never touch: two masks are never neighbours in Part A
        assert np.all(np.diff(mask_positions) >= 2)
    if mode == "causal":  # the whole text, left to right: positions + block positions count 0, 1, 2, ...
        assert sep == 1 and masked == n
        np.testing.assert_array_equal((positions + blocks)[:total], np.arange(total))
    if mode == "gmask":
        assert mask_positions.tolist() == [sep - 1]
        assert 1 <= masked <= n and data.gmask_ratio_min * n - 1 < masked < data.gmask_ratio_max * n + 1
        if np.ceil(data.gmask_ratio_min * n - 1e-9) <= np.floor(data.gmask_ratio_max * n + 1e-9):
            assert data.gmask_ratio_min * n - 1e-9 <= masked <= data.gmask_ratio_max * n + 1e-9


@st.composite
def cases(draw):
    seq_length = draw(st.integers(8, 96))
    data = DataConfig(seq_length=seq_length, mask_ratio=draw(st.sampled_from([0.15, 0.3, 0.5])),
                      poisson_lambda=draw(st.sampled_from([1.0, 3.0, 6.0])),
                      gmask_ratio_min=draw(st.sampled_from([0.2, 0.5, 0.9])), gmask_ratio_max=1.0,
                      modes={m: 1.0 for m in MODES})
    if draw(st.booleans()):
        data.gmask_ratio_max = draw(st.sampled_from([data.gmask_ratio_min, 0.95]))
    n = draw(st.integers(1, text_length(data)))
    tokens = ORDINARY[draw(st.lists(st.integers(0, len(ORDINARY) - 1), min_size=n, max_size=n))]
    return data, tokens, draw(st.sampled_from(MODES)), draw(st.integers(0, 2 ** 32)), draw(st.integers(0, 10 ** 9))


@settings(max_examples=300, deadline=None)
@given(cases())
def test_sample_invariants(case):
    data, tokens, mode, seed, index = case
    infilling = BlankInfilling(data, TOKENIZER)
    sample = infilling(tokens, sample_rng(seed, index), mode=mode)
    check_sample(sample, tokens, mode, data)
    again = infilling(tokens, sample_rng(seed, index), mode=mode)
    for key in sample:
        np.testing.assert_array_equal(again[key], sample[key])


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2 ** 32), st.integers(0, 10 ** 6))
def test_mixture_draws_a_configured_mode_and_is_a_function_of_seed_and_index(seed, index):
    data = DataConfig(seq_length=64, modes={"mask": 0.5, "gmask": 0.5})
    infilling = BlankInfilling(data, TOKENIZER)
    tokens = np.array(TOKENIZER.encode(TEXT)[:infilling.text_length])
    first, second = (infilling(tokens, sample_rng(seed, index)) for _ in range(2))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    modes = {m for m, i in MASK_IDS.items() if i in first["input_ids"][:first["sep"]]}
    assert len(modes) == 1 and modes <= {"mask", "gmask"}


def test_mask_mode_follows_the_poisson_span_lengths():
    """Over many long texts the [MASK] span lengths average near lambda = 3 (truncated Poisson: 3.16)."""
    data = DataConfig(seq_length=512, modes={"mask": 1.0})
    infilling = BlankInfilling(data, TOKENIZER)
    tokens = ORDINARY[np.random.default_rng(0).integers(0, len(ORDINARY), infilling.text_length)]
    lengths = [e - b - 1 for i in range(300) for b, e in part_b_spans(infilling(tokens, sample_rng(1, i)))]
    mean_of_poisson_given_positive = 3 / (1 - np.exp(-3))
    assert abs(np.mean(lengths) - mean_of_poisson_given_positive) < 0.25


def test_smask_blanks_whole_sentences():
    data = DataConfig(seq_length=128, modes={"smask": 1.0})
    infilling = BlankInfilling(data, TOKENIZER)
    tokens = np.array(TOKENIZER.encode(TEXT)[:infilling.text_length])
    sample = infilling(tokens, sample_rng(0, 0))
    for b, e in part_b_spans(sample):
        text = TOKENIZER.decode(sample["input_ids"][b + 1:e])
        assert text.rstrip(" \t")[-1] in ".?!;:\n" or sample["position_ids"][b] == sample["sep"] - 1


@pytest.mark.parametrize("seq_length", [8, 9, 64, 128, 2048])
@pytest.mark.parametrize("modes", [{"mask": 1.0}, {"gmask": 1.0}, {"mask": 0.3, "smask": 0.2, "gmask": 0.5}])
def test_text_length_is_the_longest_text_that_always_fits(seq_length, modes):
    data = DataConfig(seq_length=seq_length, modes=modes)
    n = text_length(data)
    assert n + 1 + 2 * max_blanks(n, data) <= seq_length < n + 2 + 2 * max_blanks(n + 1, data)
    if modes == {"gmask": 1.0}:
        assert n == seq_length - 3
    else:
        assert max_blanks(n, data) == covered_target(n, 0.15)


def test_worst_case_sample_fills_seq_length_exactly():
    """Blanks of one token each, as many as [MASK] may make: the sample is exactly n + 1 + 2k long."""
    data = DataConfig(seq_length=32)
    n = text_length(data)
    k = max_blanks(n, data)
    tokens = ORDINARY[:n]
    spans = [(2 * j, 2 * j + 1) for j in range(k)]
    sample = assemble(tokens, spans, TOKENIZER.mask_id, np.arange(k), TOKENIZER, data.seq_length)
    assert sample["sep"] + int(sample["loss_mask"].sum()) == n + 1 + 2 * k <= data.seq_length
    with pytest.raises(DataError, match="needs .* positions"):
        assemble(tokens, spans, TOKENIZER.mask_id, np.arange(k), TOKENIZER, n + 2 * k)


def test_seq_length_too_short_for_one_span_is_a_clear_error():
    with pytest.raises(DataError, match="too short for one blank"):
        text_length(dataclasses.replace(DataConfig(), seq_length=3))
    with pytest.raises(DataError, match="texts must hold 1..5 tokens"):
        BlankInfilling(DataConfig(seq_length=8), TOKENIZER)(ORDINARY[:6], sample_rng(0, 0))


def test_causal_mode_is_gmask_sop_text_endoftext():
    """GLM-4's objective: [gMASK] <sop> x_1 .. x_n predicted as x_1 .. x_n <|endoftext|>, causal (sep 1)."""
    data = DataConfig(seq_length=16, modes={"causal": 1.0})
    infilling = BlankInfilling(data, TOKENIZER)
    tokens = ORDINARY[:5]
    sample = infilling(tokens, sample_rng(0, 0))
    tok = TOKENIZER
    assert (sample["sep"], sample["length"]) == (1, 7) and infilling.length(tokens, sample_rng(0, 0)) == 7
    np.testing.assert_array_equal(sample["input_ids"][:7], [tok.gmask_id, tok.sop_id, *tokens])
    np.testing.assert_array_equal(sample["labels"][:7], [tok.pad_id, *tokens, tok.eot_id])
    np.testing.assert_array_equal(sample["loss_mask"][:7], [0] + [1] * 6)
    np.testing.assert_array_equal(sample["position_ids"] + sample["block_position_ids"], [*range(7)] + [0] * 9)
