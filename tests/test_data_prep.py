"""glm-prep: text -> .bin/.idx -> the same text back; every bad input one `error:` line, exit 2, no output."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.data.indexed import IndexedDataset
from trainer.data.prep import main
from trainer.data.tokenizer import load_tokenizer

TEXT = "GLM fills blanks.\nPart A is read both ways; Part B left to right \u2014 caf\u00e9, \u6587\u672c\u3002\n"
RECORDS = ["first record", "", "third\r\nrecord with [MASK] and <|endoftext|> typed by a user", TEXT * 3]


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 5, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in RECORDS), encoding="utf-8")
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]


def outputs(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))


def test_round_trip_text_to_bin_idx_and_back(tmp_path, inputs, capsys):
    prefix = str(tmp_path / "out" / "corpus")
    assert main(["--input", *inputs, "--output-prefix", prefix, "--vocab-size", "300", "--workers", "1"]) == 0
    assert "5 documents" in capsys.readouterr().out
    ds, tokenizer = IndexedDataset(prefix), load_tokenizer(prefix + ".tokenizer.json")
    assert [tokenizer.decode(ds[d]) for d in range(len(ds))] == [TEXT * 5, *RECORDS]
    assert ds.dtype == np.uint16 and not set(ds.tokens.tolist()) & tokenizer.special_ids
    again = str(tmp_path / "out" / "again")  # an existing tokenizer, two workers: the same tokens
    assert main(["--input", *inputs, "--output-prefix", again, "--tokenizer", prefix + ".tokenizer.json",
                 "--workers", "2"]) == 0
    np.testing.assert_array_equal(IndexedDataset(again).tokens, ds.tokens)
    np.testing.assert_array_equal(IndexedDataset(again).offsets, ds.offsets)


def test_embedded_prints_decoded_samples_of_every_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path))
    assert main(["--embedded", "--samples", "3", "--seq-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "sample 0 (mask" in out and "sample 1 (smask" in out and "sample 2 (gmask" in out
    assert "Part B, [MASK] at" in out and "Part B, [sMASK] at" in out and "Part B, [gMASK] at" in out
    assert "[CLS]" in out


def plain_tokenizer(path) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet,
                                                              show_progress=False))
    tokenizer.save(str(path))


BAD_INPUTS = {
    "missing file": ([], "missing.txt does not exist"),
    "empty file": ([("empty.txt", b"")], "empty.txt is empty"),
    "invalid UTF-8": ([("latin.txt", b"caf\xe9\n")], "latin.txt is not valid UTF-8"),
    "JSON lines without text": ([("x.jsonl", b'{"text": "ok"}\n{"title": "no text"}\n')],
                                'x.jsonl line 2 has no string field "text"'),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(tmp_path, inputs, capsys, case):
    files, message = BAD_INPUTS[case]
    for name, content in files:
        (tmp_path / name).write_bytes(content)
    bad = [str(tmp_path / (files[0][0] if files else "missing.txt"))]
    # the bad file comes last, after good text was already tokenized
    code = main(["--input", *inputs, *bad, "--output-prefix", str(tmp_path / "out"), "--vocab-size", "300",
                 "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert outputs(tmp_path) == [] and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_tokenizer_without_special_tokens(tmp_path, inputs, capsys):
    plain_tokenizer(tmp_path / "plain.json")
    args = ["--input", *inputs, "--output-prefix", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "plain.json"),
            "--workers", "1"]
    assert main(args) == 2
    assert "lacks the GLM special token(s) [CLS], [MASK]" in capsys.readouterr().err and outputs(tmp_path) == []
    assert main([*args, "--add-special-tokens"]) == 0
    plain = Tokenizer.from_file(str(tmp_path / "plain.json")).get_vocab_size()
    completed = load_tokenizer(tmp_path / "out.tokenizer.json")
    assert completed.vocab_size == plain + 7 and completed.cls_id == plain
    ds = IndexedDataset(tmp_path / "out")
    assert completed.decode(ds[0]) == TEXT * 5


def test_seq_length_too_short_for_one_span(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path))
    assert main(["--embedded", "--samples", "1", "--seq-length", "5"]) == 2
    assert "too short for one blank" in capsys.readouterr().err


def test_console_script_exit_status(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainer.data.prep", "--input", str(tmp_path / "none.txt"),
                             "--output-prefix", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: input") and result.stdout == ""
