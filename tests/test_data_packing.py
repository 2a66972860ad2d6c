"""Packing (trainer/data/packing.py): rows hold whole samples unchanged with their segments; every sample's
properties hold inside a row; the plan is deterministic, random-access and uses every sample once; short
documents leave almost no padding; instruction samples and GLM-130B's mixture pack."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_data_blank_infilling import ORDINARY, TOKENIZER, check_sample
from trainer.data.blank_infilling import MODES, BlankInfilling, sample_rng, text_length
from trainer.data.config import DataConfig
from trainer.data.corpus import embedded_paragraphs_corpus
from trainer.data.packing import (ARRAY_KEYS, KEPT_WINDOWS, OneSamplePerRow, PackedSequences, best_fit_decreasing,
                                  build_sequences, pack)
from trainer.data.prep import main as prep_main
from trainer.errors import ConfigError
from trainer.model.mask import dense_mask

MIXTURE = {"mask": 0.5, "smask": 0.2, "gmask": 0.3}


@pytest.fixture(scope="module")
def paragraphs() -> str:
    return str(embedded_paragraphs_corpus())


def unpack(row: dict, start: int, length: int, seq_length: int, pad_id: int) -> dict:
    """The sample at [start, start + length) of a row, padded back to seq_length as the datasets make it."""
    sample = {}
    for key in ARRAY_KEYS:
        sample[key] = np.full(seq_length, pad_id if key in ("input_ids", "labels") else 0, dtype=np.int64)
        sample[key][:length] = row[key][start:start + length]
    sample["sep"] = int(row["segment_sep"][start] - start)
    return sample


def test_rows_hold_whole_samples_with_their_segments(paragraphs):
    rows = build_sequences(DataConfig(path=paragraphs, seq_length=256, modes=MIXTURE), seed=3)
    pad = rows.tokenizer.pad_id
    for k in range(12):
        row, members = rows[k], rows.members(k)
        assert len(members) == len(row["starts"]) > 1
        for start, index in zip(row["starts"], members):
            sample = rows.samples[index]
            length = sample["length"]
            for key in ARRAY_KEYS:
                np.testing.assert_array_equal(row[key][start:start + length], sample[key][:length])
            assert (row["segment_start"][start:start + length] == start).all()
            assert (row["segment_sep"][start:start + length] == start + sample["sep"]).all()
        end = row["tokens"]
        assert end == rows.real_tokens(k) == sum(rows.samples[i]["length"] for i in members)
        assert (row["input_ids"][end:] == pad).all() and not row["loss_mask"][end:].any()
        assert (row["segment_start"][end:] == end).all() and (row["segment_sep"][end:] == end).all()


@st.composite
def packed_cases(draw):
    seq_length = draw(st.sampled_from([48, 96, 160]))
    data = DataConfig(seq_length=seq_length, mask_ratio=draw(st.sampled_from([0.15, 0.3])), modes={m: 1.0 for m in MODES})
    n_max = text_length(data)
    texts = draw(st.lists(st.lists(st.integers(0, len(ORDINARY) - 1), min_size=1, max_size=n_max),
                          min_size=1, max_size=8))
    modes = draw(st.lists(st.sampled_from(MODES), min_size=len(texts), max_size=len(texts)))
    return data, [ORDINARY[t] for t in texts], modes, draw(st.integers(0, 2 ** 32))


@settings(max_examples=150, deadline=None)
@given(packed_cases())
def test_sample_properties_hold_for_every_sample_inside_a_packed_row(case):
    """Samples packed by best fit into rows: each, cut back out, passes tests/test_data_blank_infilling's
    check_sample; the row's mask lets no sample see another and no Part A see its Part B."""
    data, texts, modes, seed = case
    infilling = BlankInfilling(data, TOKENIZER)
    samples = [infilling(tokens, sample_rng(seed, i), mode=mode) for i, (tokens, mode) in enumerate(zip(texts, modes))]
    lengths = np.array([s["length"] for s in samples])
    for bin_items in best_fit_decreasing(lengths, data.seq_length):
        row = pack([samples[i] for i in bin_items], data.seq_length, TOKENIZER.pad_id)
        segments = torch.from_numpy(np.stack([row["segment_start"], row["segment_sep"]]))[None]
        visible = dense_mask(segments)[0, 0].numpy()  # [s, s]
        for start, i in zip(row["starts"], bin_items):
            end, sep = start + int(lengths[i]), start + samples[i]["sep"]
            check_sample(unpack(row, start, int(lengths[i]), data.seq_length, TOKENIZER.pad_id), texts[i], modes[i], data)
            assert not visible[start:end, :start].any() and not visible[start:end, end:].any()
            assert not visible[start:sep, sep:end].any() and visible[start:end, start:sep].all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=0, max_size=60), st.integers(0, 30))
def test_best_fit_decreasing_places_every_item_once_within_capacity(lengths, first):
    lengths = np.array(lengths, dtype=np.int64)
    bins = best_fit_decreasing(lengths, 64, first=min(first, len(lengths)))
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= 64 for b in bins)
    assert sum(lengths[b].sum() < 32 for b in bins) <= 1  # two bins under half full would have merged


def test_plan_is_a_function_of_seed_and_row_and_random_access(paragraphs):
    data = DataConfig(path=paragraphs, seq_length=512, modes=MIXTURE, packing_window=64)
    walked = build_sequences(data, seed=7)
    expected = [walked.members(k) for k in range(120)]
    jumped = build_sequences(data, seed=7)  # a resumed process: first asks for row 119
    assert [jumped.members(k) for k in reversed(range(120))] == expected[::-1]
    assert build_sequences(data, seed=8).members(0) != expected[0]


def test_every_sample_is_used_once_and_never_after_its_window(paragraphs):
    window = 64
    rows = build_sequences(DataConfig(path=paragraphs, seq_length=512, modes=MIXTURE, packing_window=window), seed=7)
    used = [i for k in range(300) for i in rows.members(k)]
    assert len(used) == len(set(used))
    last_window = rows._locate(299)[0]
    assert set(range(last_window * window)) <= set(used)  # every earlier window's samples are all out
    assert max(used) < (last_window + 2) * window  # at most one window early
    for k in range(300):  # a row holds samples of its own window and of the next one only
        w = rows._locate(k)[0]
        assert all(w * window <= i < (w + 2) * window for i in rows.members(k))


@pytest.mark.parametrize("seq_length", [1024, 2048])
def test_short_documents_leave_at_most_5_percent_padding_per_step(paragraphs, seq_length):
    data = DataConfig(path=paragraphs, seq_length=seq_length, modes=MIXTURE)
    batch, steps = 8, 40
    for packing, check in ((True, lambda waste: waste <= 0.05), (False, lambda waste: waste >= 0.5)):
        data.packing = packing
        rows = build_sequences(data, seed=1234)
        for step in range(steps):
            tokens = sum(rows.real_tokens(k) for k in range(step * batch, (step + 1) * batch))
            waste = 1 - tokens / (batch * seq_length)
            assert check(waste), (packing, step, waste)


def test_unpacked_rows_are_the_samples(paragraphs):
    rows = build_sequences(DataConfig(path=paragraphs, seq_length=128, modes=MIXTURE, packing=False), seed=3)
    assert isinstance(rows, OneSamplePerRow) and not isinstance(rows, PackedSequences)
    for k in range(5):
        sample, row = rows.samples[k], rows[k]
        assert rows.members(k) == [k] and row["tokens"] == sample["length"] == rows.real_tokens(k)
        for key in ARRAY_KEYS:
            np.testing.assert_array_equal(row[key], sample[key])


def test_instruction_samples_pack_with_prompt_and_response_together(tmp_path):
    records = tmp_path / "sft.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?",
                                           "response": f"It is {2 * i}."}) + "\n" for i in range(60)))
    prep_main(["--input", str(records), "--output-prefix", str(tmp_path / "sft"), "--instructions",
               "--vocab-size", "300"])
    rows = build_sequences(DataConfig(path=str(tmp_path / "sft"), seq_length=128), seed=0)
    tokenizer = rows.tokenizer
    for k in range(4):
        row = rows[k]
        assert len(row["starts"]) > 2 and row["tokens"] == rows.real_tokens(k)  # the plan's lengths are the samples'
        for start, index in zip(row["starts"], rows.members(k)):
            sample = rows.samples[index]
            sep, length = sample["sep"], sample["length"]
            prompt, response = rows.samples.record(index)
            assert row["input_ids"][start + sep - 1] == tokenizer.gmask_id
            np.testing.assert_array_equal(row["input_ids"][start + sep + 1:start + length], response)
            np.testing.assert_array_equal(row["input_ids"][start + 1:start + sep - 1], prompt)


def test_glm130b_mixture_packs_short_mask_samples_beside_full_length_gmask_samples():
    """GLM-130B: [MASK] samples of <= 512 tokens packed into 2048 rows, [gMASK] samples as long as the row."""
    data = DataConfig(seq_length=2048, mixture_unit="tokens", datasets=[
        {"path": "", "weight": 0.3, "modes": {"mask": 1.0}, "seq_length": 512},
        {"path": "", "weight": 0.7, "modes": {"gmask": 1.0}}])
    data.validate()
    rows = build_sequences(data, seed=0)
    mask_id, gmask_id = rows.tokenizer.mask_id, rows.tokenizer.gmask_id
    mask_lengths, gmask_lengths, mask_rows = [], [], 0
    for k in range(60):
        row, members = rows[k], rows.members(k)
        assert row["tokens"] == rows.real_tokens(k)  # the plan's lengths are the samples'
        kinds = [rows.samples.locate(i)[0] for i in members]
        for start, index, kind in zip(row["starts"], members, kinds):
            part_a = row["input_ids"][start:start + rows.samples[index]["sep"]]
            assert (gmask_id if kind else mask_id) in part_a
            (gmask_lengths if kind else mask_lengths).append(rows.samples.sample_length(index))
        mask_rows += kinds.count(0) >= 3
    assert max(mask_lengths) <= 512 and mask_rows >= 5
    # a long document's [gMASK] pieces fill a whole row (text of seq_length - 3, [CLS], sop, eop); shorter
    # samples are the ends of documents, which pack beside others
    assert np.mean(np.array(gmask_lengths) == 2048) > 0.2


def test_dataset_entry_settings_are_checked():
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].seq_length"):
        DataConfig(seq_length=512, datasets=[{"path": "", "weight": 1, "seq_length": 1024}]).validate()
    with pytest.raises(ConfigError, match=r"data.datasets\[0\]: data.modes"):
        DataConfig(datasets=[{"path": "", "weight": 1, "modes": {"blank": 1}}]).validate()
    with pytest.raises(ConfigError, match=r"data.datasets\[0\]"):
        DataConfig(datasets=[{"path": "", "weight": 1, "mode": {"mask": 1}}]).validate()
    with pytest.raises(ConfigError, match="packing_window"):
        DataConfig(packing_window=0).validate()


def test_a_saved_position_resumes_the_scan_without_the_windows_before(paragraphs):
    data = DataConfig(path=paragraphs, seq_length=512, modes=MIXTURE, packing_window=64)
    walked = build_sequences(data, seed=7)
    expected = [walked.members(k) for k in range(200)]
    position = json.loads(json.dumps(walked.position(150)))  # as the checkpoint stores it
    resumed = build_sequences(data, seed=7)
    resumed.restore(position)
    assert [resumed.members(k) for k in range(150, 200)] == expected[150:]
    assert resumed._base == position["window"] > 0  # it did not scan from window 0
    assert resumed.members(3) == expected[3]  # a row before the position: scanned again from the start
    other = build_sequences(DataConfig(path=paragraphs, seq_length=512, modes=MIXTURE, packing_window=32), seed=7)
    other.restore(position)  # another data config's position is not used
    assert other._base == 0 and other.members(150) == [other.members(k) for k in range(151)][150]


def test_the_scan_state_stays_bounded_and_old_rows_are_found_again(paragraphs):
    data = DataConfig(path=paragraphs, seq_length=256, modes=MIXTURE, packing_window=16)
    walked = build_sequences(data, seed=2)
    expected = [walked.members(k) for k in range(400)]
    assert len(walked._taken) <= KEPT_WINDOWS and walked._base > 0
    assert walked.members(5) == expected[5] and walked.members(399) == expected[399]  # rescanned from 0
