"""Building a corpus: documents (the user's files or the embedded pydoc text) -> tokens -> PREFIX.bin/.idx.

A text file is one document. A JSON lines file (.jsonl, .ndjson, .json) holds one document per
line, the string in its `text` field; blank lines are skipped. Everything must be UTF-8.
Documents are tokenized by `workers` processes in file order; output appears only when complete.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from trainer.data.indexed import IndexedDatasetWriter, dtype_for_vocab
from trainer.data.tokenizer import GLMTokenizer, load_tokenizer, train_tokenizer
from trainer.errors import DataError

EMBEDDED_VOCAB_SIZE = 4096
"""The embedded tokenizer: 4096 ids (= 32 * 128, no vocabulary padding for tp <= 32)."""
PARAGRAPH_MIN_CHARS = 80
"""embedded_paragraphs() drops shorter paragraphs (headings, single code lines)."""
BATCH_CHARS = 1 << 16
"""Text per unit of work sent to a tokenizer process."""

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")


def check_inputs(paths: list[str | os.PathLike]) -> None:
    """Fail before any work if an input is missing, not a file, or empty."""
    if not paths:
        raise DataError("no input files: pass --input FILE [FILE ...] (text files or JSON lines)")
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"input {path} does not exist: check the path")
        if not path.is_file():
            raise DataError(f"input {path} is not a regular file: pass text or JSON lines files")
        if path.stat().st_size == 0:
            raise DataError(f"input {path} is empty: remove it from --input or give it some text")


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """The documents of one input file, in file order."""
    path = Path(path)
    if path.suffix.lower() in JSON_LINES_SUFFIXES:
        yield from _json_lines(path)
    else:
        yield _text_file(path)


def _text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"input {path} is not valid UTF-8 (byte {error.start}: {error.reason}): "
                        f"convert it, e.g. `iconv -f LATIN1 -t UTF-8`") from None
    if not text.strip():
        raise DataError(f"input {path} holds only whitespace: remove it from --input or give it some text")
    return text


def json_lines(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(where, line) of every non-blank line of a UTF-8 JSON-lines file; `where` names the file and line
    for error messages."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"input {path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where} is not valid UTF-8 (byte {error.start} of the line: {error.reason}): "
                                f"convert the file to UTF-8") from None
            if line.strip():
                yield where, line


def _json_lines(path: Path) -> Iterator[str]:
    documents = 0
    for where, line in json_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where} is not valid JSON ({error.msg}): one JSON object per line, "
                            f"e.g. {{\"text\": \"...\"}}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{where} has no string field \"text\": each line must be an object like "
                            f"{{\"text\": \"...\"}}")
        documents += 1
        yield record["text"]
    if documents == 0:
        raise DataError(f"input {path} holds no JSON lines: one object {{\"text\": \"...\"}} per line")


def embedded_documents() -> list[str]:
    """The Python language reference shipped with CPython (`pydoc_data.topics`), one topic per document,
    sorted by topic name so that the corpus is the same on every run."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def cache_dir() -> Path:
    """$GLM_CACHE_DIR, else ~/.cache/glm-trainer."""
    return Path(os.environ.get("GLM_CACHE_DIR") or Path.home() / ".cache" / "glm-trainer")


def embedded_corpus() -> Path:
    """The prefix of the embedded corpus (PREFIX.bin/.idx/.tokenizer.json), built on first use.

    Its directory is named by a hash of the text and the settings. A builder works in a private
    temporary directory and renames it into place (atomic); when two processes race, the loser's
    rename fails on the existing directory and it uses the winner's."""
    documents = embedded_documents()
    return _cached_corpus("pydoc", documents, lambda: train_tokenizer(documents, EMBEDDED_VOCAB_SIZE))


def embedded_paragraphs() -> list[str]:
    """The embedded text as short documents: every paragraph (blank-line separated) of PARAGRAPH_MIN_CHARS
    characters or more of every topic, in topic order. A corpus of short documents, as web pages, chat
    turns and code snippets are, for packing measurements."""
    return [paragraph.strip() for topic in embedded_documents() for paragraph in topic.split("\n\n")
            if len(paragraph.strip()) >= PARAGRAPH_MIN_CHARS]


def embedded_paragraphs_corpus() -> Path:
    """The prefix of the paragraphs corpus (embedded_paragraphs(), the embedded corpus's tokenizer), built
    on first use in the cache directory like embedded_corpus()."""
    tokenizer_path = f"{embedded_corpus()}.tokenizer.json"
    return _cached_corpus("pydoc-paragraphs", embedded_paragraphs(), lambda: load_tokenizer(tokenizer_path),
                          salt=Path(tokenizer_path).read_text())


def _cached_corpus(name: str, documents: list[str], make_tokenizer: Callable[[], GLMTokenizer],
                   salt: str = "") -> Path:
    """PREFIX of `documents` prepared once under cache_dir()/NAME-HASH (the hash of text and settings)."""
    digest = hashlib.sha256(json.dumps([EMBEDDED_VOCAB_SIZE, documents, salt]).encode()).hexdigest()[:16]
    final = cache_dir() / f"{name}-{digest}"
    if not (final / "corpus.idx").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}-"))
        try:
            prepare(documents, work / "corpus", make_tokenizer(), workers=1, progress=False)
            try:
                os.rename(work, final)
            except OSError:
                if not (final / "corpus.idx").is_file():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final / "corpus"


def prepare(documents: Iterable[str], prefix: str | os.PathLike, tokenizer: GLMTokenizer, workers: int,
            progress: bool = True, total_chars: Optional[int] = None) -> tuple[int, int]:
    """Tokenize `documents` into PREFIX.bin/.idx and save PREFIX.tokenizer.json; returns (documents, tokens).
    Nothing appears under PREFIX if reading, tokenizing or saving the tokenizer fails: the tokenizer is saved
    before the writer renames the new .bin/.idx into place, so a corpus is never published without it."""
    with IndexedDatasetWriter(prefix, dtype_for_vocab(tokenizer.vocab_size)) as writer, \
            tqdm(total=total_chars, unit="char", unit_scale=True, desc="glm-prep", disable=not progress or None) as bar:
        for tokens in tokenize(documents, tokenizer, workers, bar.update):
            writer.add_document(tokens)
        if writer.offsets[-1] == 0:
            raise DataError("the input holds no text to tokenize: give documents with some text")
        tokenizer.save(f"{prefix}.tokenizer.json")
    return len(writer.offsets) - 1, writer.offsets[-1]


def tokenize(documents: Iterable[str], tokenizer: GLMTokenizer, workers: int,
             advance: Callable[[int], object] = lambda chars: None) -> Iterator[np.ndarray]:
    """The token ids of each document, in order. With workers > 1, batches of documents go to a pool of
    processes, at most 2 * workers batches in flight so memory stays bounded on any corpus size."""
    if workers <= 1:
        for document in documents:
            yield np.asarray(tokenizer.encode(document), dtype=np.uint32)
            advance(len(document))
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds tokenizers' threads
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer.to_str(),)) as pool:
        in_flight = collections.deque()
        for batch in _batches(documents):
            in_flight.append((pool.apply_async(_encode_batch, (batch,)), sum(map(len, batch))))
            if len(in_flight) >= 2 * workers:
                yield from _collect(in_flight.popleft(), advance)
        while in_flight:
            yield from _collect(in_flight.popleft(), advance)


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _collect(job: tuple, advance: Callable[[int], object]) -> list[np.ndarray]:
    result, chars = job
    arrays = result.get()
    advance(chars)
    return arrays


_worker_tokenizer: Optional[GLMTokenizer] = None


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = GLMTokenizer(Tokenizer.from_str(tokenizer_json))


def _encode_batch(batch: list[str]) -> list[np.ndarray]:
    return [np.asarray(_worker_tokenizer.encode(document), dtype=np.uint32) for document in batch]
