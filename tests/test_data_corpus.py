"""Reading documents, parallel tokenization, and the embedded corpus built once and safely under a race."""
from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest

from trainer.data import corpus
from trainer.data.corpus import check_inputs, embedded_corpus, embedded_documents, read_documents, tokenize
from trainer.data.indexed import IndexedDataset
from trainer.data.tokenizer import load_tokenizer, train_tokenizer
from trainer.errors import DataError


def test_text_file_is_one_document_and_json_lines_one_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond paragraph \u2014 caf\u00e9\n", encoding="utf-8")
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two\nlines"}), json.dumps({"text": ""})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    assert list(read_documents(tmp_path / "a.txt")) == ["first line\n\nsecond paragraph \u2014 caf\u00e9\n"]
    assert list(read_documents(tmp_path / "b.jsonl")) == ["one", "two\nlines", ""]


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"ok \xff\xfe then", r"bad\.txt is not valid UTF-8 \(byte 3"),
    ("blank.txt", b" \n\t\n", "only whitespace"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl line 2 is not valid UTF-8"),
    ("notext.jsonl", b'{"text": "fine"}\n{"body": "no text"}\n', r"notext\.jsonl line 2 has no string field \"text\""),
    ("number.jsonl", b'{"text": 5}\n', r"line 1 has no string field"),
    ("broken.jsonl", b'{"text": "fine"}\n{"text": \n', r"broken\.jsonl line 2 is not valid JSON"),
    ("blanklines.jsonl", b"\n\n", "holds no JSON lines"),
])
def test_bad_documents_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(read_documents(tmp_path / name))


def test_missing_and_empty_inputs_fail_before_any_work(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="missing.txt does not exist"):
        check_inputs([tmp_path / "missing.txt"])
    with pytest.raises(DataError, match="empty.txt is empty"):
        check_inputs([tmp_path / "empty.txt"])
    with pytest.raises(DataError, match="not a regular file"):
        check_inputs([tmp_path])
    with pytest.raises(DataError, match="no input files"):
        check_inputs([])


def test_parallel_tokenization_equals_serial(monkeypatch):
    documents = embedded_documents()[:12]
    tokenizer = train_tokenizer(documents, 600)
    monkeypatch.setattr(corpus, "BATCH_CHARS", 20_000)  # several batches in flight
    serial = list(tokenize(documents, tokenizer, workers=1))
    parallel = list(tokenize(documents, tokenizer, workers=2))
    assert len(parallel) == len(documents)
    for a, b, text in zip(serial, parallel, documents):
        np.testing.assert_array_equal(a, b)
        assert tokenizer.decode(a) == text


def _build_embedded(queue) -> None:
    queue.put(str(embedded_corpus()))


def test_embedded_corpus_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    builders = [context.Process(target=_build_embedded, args=(queue,)) for _ in range(2)]
    for p in builders:
        p.start()
    prefixes = {queue.get(timeout=60) for _ in builders}
    for p in builders:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(prefixes) == 1 and [p.name for p in tmp_path.iterdir()] == [prefixes.pop().split("/")[-2]]
    prefix = embedded_corpus()  # reused, not rebuilt
    ds, tokenizer = IndexedDataset(prefix), load_tokenizer(f"{prefix}.tokenizer.json")
    assert 4000 <= tokenizer.vocab_size <= 8000 and ds.dtype == np.uint16
    documents = embedded_documents()
    assert len(ds) == len(documents) and tokenizer.decode(ds[3]) == documents[3]


def test_a_builder_that_loses_the_race_uses_the_winners_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path))
    real_train, calls, winner = corpus.train_tokenizer, [], []

    def train_while_another_process_finishes(texts, vocab_size):
        calls.append(vocab_size)
        if len(calls) == 1:  # the other builder starts and finishes while this one trains
            winner.append(embedded_corpus())
        return real_train(texts, vocab_size)

    monkeypatch.setattr(corpus, "train_tokenizer", train_while_another_process_finishes)
    assert embedded_corpus() == winner[0]
    assert [p.name for p in tmp_path.iterdir()] == [winner[0].parent.name]  # the loser's work is gone
