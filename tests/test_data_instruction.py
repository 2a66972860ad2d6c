"""Instruction samples: properties of the [gMASK] prompt/response layout (hypothesis), truncation, glm-prep
--instructions round trip, history format, refusals and the truncation count; GLM-4's chat layout."""
from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data.config import DataConfig
from trainer.data.dataset import build_dataset, check_data_files
from trainer.data.instruction import InstructionFormat, format_prompt
from trainer.data.prep import main as prep_main
from trainer.data.tokenizer import train_tokenizer
from trainer.errors import DataError
from trainer.model.mask import dense_mask, segments_of_sep

import torch

PROMPT_IDS, RESPONSE_IDS = (10, 99), (100, 199)  # inclusive, disjoint, so a response token is recognisable anywhere


@functools.lru_cache(maxsize=1)
def tokenizer():
    return train_tokenizer(["question and answer " * 20], 300)


@st.composite
def records(draw):
    seq_length = draw(st.integers(8, 48))
    response = draw(st.lists(st.integers(*RESPONSE_IDS), min_size=1, max_size=seq_length - 3))
    prompt = draw(st.lists(st.integers(*PROMPT_IDS), min_size=0, max_size=60))
    return np.array(prompt, dtype=np.int64), np.array(response, dtype=np.int64), seq_length


@settings(max_examples=200, deadline=None)
@given(records(), st.sampled_from(["left", "right"]))
def test_instruction_sample_layout(record, truncation):
    prompt, response, seq_length = record
    tok = tokenizer()
    sample = InstructionFormat(tok, seq_length, truncation)(prompt, response)
    sep, R = int(sample["sep"]), len(response)
    kept = min(len(prompt), seq_length - 3 - R)
    assert sep == kept + 2
    for key in ("input_ids", "labels", "loss_mask", "position_ids", "block_position_ids"):
        assert sample[key].dtype == np.int64 and sample[key].shape == (seq_length,)
    ids = sample["input_ids"]
    # Part A = [CLS] + the prompt's end (left) or start (right) + [gMASK]: it never holds a response token,
    # and the mask lets no Part A row see a column at or after sep.
    expected_prompt = prompt[len(prompt) - kept:] if truncation == "left" else prompt[:kept]
    np.testing.assert_array_equal(ids[:sep], np.concatenate([[tok.cls_id], expected_prompt, [tok.gmask_id]]))
    assert not np.isin(ids[:sep], np.arange(RESPONSE_IDS[0], RESPONSE_IDS[1] + 1)).any()
    visible = dense_mask(segments_of_sep(torch.tensor([sep]), seq_length))[0, 0].numpy()  # [s, s]
    assert not visible[:sep, sep:].any()
    # Part B: sop + the whole response, predicting the response then eop; the loss covers exactly those.
    end = sep + R + 1
    np.testing.assert_array_equal(ids[sep:end], np.concatenate([[tok.sop_id], response]))
    np.testing.assert_array_equal(sample["labels"][sample["loss_mask"] == 1], np.concatenate([response, [tok.eop_id]]))
    np.testing.assert_array_equal(np.flatnonzero(sample["loss_mask"]), np.arange(sep, end))
    np.testing.assert_array_equal(sample["position_ids"][:end], np.concatenate([np.arange(sep), np.full(R + 1, sep - 1)]))
    np.testing.assert_array_equal(sample["block_position_ids"][:end],
                                  np.concatenate([np.zeros(sep), np.arange(1, R + 2)]))
    assert (ids[end:] == tok.pad_id).all() and (sample["labels"][end:] == tok.pad_id).all()
    assert not sample["position_ids"][end:].any() and not sample["block_position_ids"][end:].any()


def test_an_answer_with_its_leading_space_gets_one_space_after_a():
    assert format_prompt("And Italy?", [["France?", " Paris."]]) == "Q: France?\nA: Paris.\nQ: And Italy?\nA:"


def test_history_is_folded_into_the_prompt():
    assert format_prompt("Hi?", []) == "Hi?"
    assert format_prompt("And Italy?", [["France?", "Paris."], ["Spain?", "Madrid."]]) == \
        "Q: France?\nA: Paris.\nQ: Spain?\nA: Madrid.\nQ: And Italy?\nA:"


def _prep(tmp_path, lines, name="sft", extra=()):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prefix = tmp_path / name
    assert prep_main(["--input", str(path), "--output-prefix", str(prefix), "--vocab-size", "300",
                      "--instructions", *extra]) == 0
    return str(prefix)


def test_prepared_records_round_trip_with_their_boundaries(tmp_path):
    lines = [{"prompt": f"question {i}?", "response": f" answer {i}.", "history": [["q", "a"]] if i % 2 else []}
             for i in range(10)]
    prefix = _prep(tmp_path, lines)
    ds = build_dataset(DataConfig(path=prefix, seq_length=64, valid_fraction=0.2), seed=3)
    assert len(ds) == 8 and len(build_dataset(DataConfig(path=prefix, seq_length=64, valid_fraction=0.2), 3, "valid")) == 2
    seen = set()
    for i in range(len(ds)):
        sample, (_, response) = ds[i], ds.record(i)
        text_a = ds.tokenizer.decode(sample["input_ids"][1:sample["sep"] - 1])
        k = int(text_a.split("question ")[1].split("?")[0])
        assert text_a == format_prompt(lines[k]["prompt"], lines[k]["history"])
        assert ds.tokenizer.decode(response) == lines[k]["response"]
        assert ds.tokenizer.decode(sample["labels"][sample["loss_mask"] == 1][:-1]) == lines[k]["response"]
        seen.add(k)
    assert seen == set(range(8))  # the training split is the first 8 records, each once per epoch
    assert check_data_files(DataConfig(path=prefix, seq_length=64)) == ds.tokenizer.vocab_size


def test_truncation_is_counted_and_configurable(tmp_path, caplog):
    long = {"prompt": "word " * 40, "response": " short."}
    prefix = _prep(tmp_path, [long, {"prompt": "hi", "response": " yo."}, long])
    with caplog.at_level(logging.INFO, logger="trainer.data.instruction"):
        ds = build_dataset(DataConfig(path=prefix, seq_length=24), seed=0)
    assert "2 of 3 instruction records truncated" in caplog.text
    assert all(int(ds[i]["loss_mask"].sum()) == len(ds.record(i)[1]) + 1 for i in range(3))
    with pytest.raises(DataError, match="instruction_truncation is 'error'"):
        build_dataset(DataConfig(path=prefix, seq_length=24, instruction_truncation="error"), seed=0)


def test_a_response_that_cannot_fit_is_refused_not_dropped(tmp_path):
    prefix = _prep(tmp_path, [{"prompt": "p", "response": " long answer" * 20}, {"prompt": "p", "response": " ok"}])
    with pytest.raises(DataError, match="1 instruction record.* longer than data.seq_length - 3"):
        build_dataset(DataConfig(path=prefix, seq_length=16), seed=0)


@pytest.mark.parametrize("line, message", [
    ({"prompt": "p"}, "needs string fields"),
    ({"prompt": "p", "response": ""}, "empty \"response\""),
    ({"prompt": "p", "response": "r", "history": [["only one"]]}, "history"),
])
def test_bad_records_fail_with_their_line_and_write_nothing(tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(line) + "\n")
    assert prep_main(["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--instructions"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2" in err and message in err
    assert not list(tmp_path.glob("out*"))


def test_a_text_prep_over_an_instruction_prefix_removes_the_marker(tmp_path):
    prefix = _prep(tmp_path, [{"prompt": "p", "response": " r"}])
    text = tmp_path / "t.txt"
    text.write_text("plain text " * 30)
    assert prep_main(["--input", str(text), "--output-prefix", prefix, "--vocab-size", "300"]) == 0
    assert type(build_dataset(DataConfig(path=prefix, seq_length=32), 0)).__name__ == "GLMDataset"


def chat_tokenizer():
    """A test tokenizer with GLM-4's role tokens added (special, after its vocabulary)."""
    from tokenizers import AddedToken

    from trainer.data.tokenizer import ROLE_TOKENS, GLMTokenizer

    backend = train_tokenizer(["question and answer " * 20], 300).backend
    backend.add_special_tokens([AddedToken(role, special=True, normalized=False) for role in ROLE_TOKENS])
    return GLMTokenizer(backend)


def test_chat_layout_is_causal_with_the_loss_on_the_response_only():
    tok = chat_tokenizer()
    user, assistant, newline = tok.role_ids["<|user|>"], tok.role_ids["<|assistant|>"], tok.encode("\n")
    prompt, response = np.arange(10, 15), np.arange(100, 103)
    formatter = InstructionFormat(tok, 32, layout="chat")
    sample = formatter(prompt, response)
    expected = [tok.gmask_id, tok.sop_id, user, *newline, *prompt, assistant, *newline, *response]
    total = len(expected)
    assert (sample["sep"], sample["length"]) == (1, total) == (1, len(prompt) + len(response) + formatter.extra_tokens)
    np.testing.assert_array_equal(sample["input_ids"][:total], expected)
    counted = np.flatnonzero(sample["loss_mask"])
    np.testing.assert_array_equal(counted, np.arange(total - len(response) - 1, total))
    np.testing.assert_array_equal(sample["labels"][counted], [*response, tok.eot_id])
    np.testing.assert_array_equal((sample["position_ids"] + sample["block_position_ids"])[:total], np.arange(total))
    # truncation keeps the whole response and the prompt's end
    short = InstructionFormat(tok, formatter.extra_tokens + len(response) + 2, layout="chat")(prompt, response)
    np.testing.assert_array_equal(short["input_ids"][3 + len(newline):5 + len(newline)], prompt[-2:])
    with pytest.raises(DataError, match="needs a GLM-4-style tokenizer"):
        InstructionFormat(tokenizer(), 32, layout="chat")
