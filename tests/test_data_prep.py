"""glm-prep: text -> .bin/.idx -> the same text back; every bad input one `error:` line, exit 2, no output."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.data.config import DataConfig
from trainer.data.corpus import embedded_corpus, embedded_paragraphs_corpus
from trainer.data.indexed import IndexedDataset
from trainer.data.packing import build_sequences
from trainer.data.prep import ROW_TEXT_WIDTH, clip, describe_row, main
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


def test_a_tokenizer_that_cannot_be_saved_publishes_no_corpus(tmp_path, inputs, monkeypatch, capsys):
    """.bin, .idx and .tokenizer.json appear together or not at all; an earlier corpus at the prefix stays whole."""
    prefix = str(tmp_path / "out" / "corpus")
    assert main(["--input", inputs[0], "--output-prefix", prefix, "--vocab-size", "300"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trainer.data.tokenizer.GLMTokenizer.save", disk_full)
    with pytest.raises(OSError):
        main(["--input", *inputs, "--output-prefix", prefix, "--vocab-size", "300"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    monkeypatch.undo()
    (tmp_path / "new.tokenizer.json").mkdir()  # in the way of the last rename: refused before anything is written
    capsys.readouterr()
    assert main(["--input", *inputs, "--output-prefix", str(tmp_path / "new"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "new.tokenizer.json is a directory" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.jsonl", "new.tokenizer.json", "out"]


def test_embedded_prints_decoded_samples_of_every_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path))
    assert main(["--embedded", "--samples", "3", "--seq-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "sample 0 (mask" in out and "sample 1 (smask" in out and "sample 2 (gmask" in out
    assert "Part B, [MASK] at" in out and "Part B, [sMASK] at" in out and "Part B, [gMASK] at" in out
    assert "[CLS]" in out
    assert "packed rows of the training stream (seq_length=64" in out
    assert "row 0:" in out and "row 2:" in out and "row 3:" not in out and "  slot 0: sample " in out


def test_describe_row_shows_each_sample_start_length_sep_and_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path))
    data = DataConfig(path=str(embedded_paragraphs_corpus()), modes={"mask": 1.0, "smask": 1.0, "gmask": 1.0})
    rows = build_sequences(data, seed=1234)  # short documents: several samples a row
    tokenizer, modes, packed = rows.tokenizer, set(), 0
    for k in range(4):
        row, members = rows[k], rows.members(k)
        packed += len(members) >= 2
        lines = describe_row(rows, k)
        assert lines[0] == (f"row {k}: {len(members)} sample(s), {row['tokens']} of {data.seq_length} slots real, "
                            f"{data.seq_length - row['tokens']} padding")
        layout = [line for line in lines if line.startswith("  slot ")]
        assert layout == describe_row(rows, k, text=False)[1:]
        for line, index, start in zip(layout, members, row["starts"], strict=True):
            sample = rows.samples[index]
            part_a = sample["input_ids"][:sample["sep"]].tolist()
            mode = next(name for name, token in (("[MASK]", tokenizer.mask_id), ("[sMASK]", tokenizer.smask_id),
                                                 ("[gMASK]", tokenizer.gmask_id)) if token in part_a)
            assert line == f"  slot {start}: sample {index}, {sample['length']} tokens, sep {sample['sep']}, {mode}"
            modes.add(mode)
        assert sum(line.startswith("    Part A (") for line in lines) == len(members)
        assert max(map(len, lines)) < ROW_TEXT_WIDTH + 60  # decoded text clipped
    assert modes == {"[MASK]", "[sMASK]", "[gMASK]"} and packed == 4


def test_clip_keeps_both_ends_of_long_text():
    assert clip("short", 100) == "short" and clip("x" * 500, None) == "x" * 500
    clipped = clip("".join(map(str, range(100))) + "[gMASK]", 40)
    assert len(clipped) == 40 and clipped.startswith("0123456789") and clipped.endswith("99[gMASK]")
    assert "\u2026" in clipped


def test_embedded_paragraphs_prints_its_prefix_and_packed_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path))
    assert main(["--embedded-paragraphs", "--samples", "1"]) == 0
    first = capsys.readouterr().out
    prefix = first.splitlines()[0].removeprefix("glm-prep: embedded paragraphs corpus (short documents) at ")
    prefix = prefix.removesuffix(".bin/.idx/.tokenizer.json")
    assert prefix.startswith(str(tmp_path)) and len(IndexedDataset(prefix)) > len(IndexedDataset(embedded_corpus()))
    assert "row 0:" in first and "  slot 0: sample " in first
    assert main(["--embedded-paragraphs"]) == 0  # reused, not rebuilt
    assert capsys.readouterr().out == first.splitlines()[0] + "\n"


def test_embedded_sources_take_no_output_options(tmp_path, capsys):
    for source in ("--embedded", "--embedded-paragraphs"):
        with pytest.raises(SystemExit) as exit_info:
            main([source, "--output-prefix", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and f"{source} takes neither --output-prefix" in capsys.readouterr().err


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
    assert "lacks the GLM special token(s) [MASK], [sMASK]" in capsys.readouterr().err and outputs(tmp_path) == []
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


def test_a_bad_seq_length_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(TEXT * 5)
    prefix = tmp_path / "out"
    assert main(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(prefix), "--vocab-size", "300",
                 "--samples", "1", "--seq-length", "5"]) == 2
    assert "too short for one blank" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))  # no PREFIX.bin / .idx / .tokenizer.json left behind


@pytest.mark.parametrize("vocab_size", ["0", "5"])
def test_a_vocabulary_too_small_is_refused(tmp_path, capsys, vocab_size):
    (tmp_path / "in.txt").write_text(TEXT * 5)
    assert main(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "out"),
                 "--vocab-size", vocab_size]) == 2
    assert f"vocab size {vocab_size} is too small" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))


def test_an_output_prefix_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(TEXT * 5)
    (tmp_path / "a_file").write_text("x")
    assert main(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "a_file" / "out"),
                 "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output-prefix") and "is a file" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in.txt"]


def test_outputs_get_the_mode_the_umask_gives(tmp_path):
    import os

    (tmp_path / "in.jsonl").write_text('{"prompt": "Q?", "response": "A."}\n' * 3)
    old = os.umask(0o022)
    try:
        assert main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
                     "--vocab-size", "300", "--instructions"]) == 0
    finally:
        os.umask(old)
    written = sorted(tmp_path.glob("out*"))
    assert len(written) == 4 and all(p.stat().st_mode & 0o777 == 0o644 for p in written), written


def test_console_script_exit_status(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainer.data.prep", "--input", str(tmp_path / "none.txt"),
                             "--output-prefix", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: input") and result.stdout == ""
