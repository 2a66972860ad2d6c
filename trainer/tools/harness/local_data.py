"""The documents of the shipped local tasks (trainer/tools/harness/tasks/*.yaml), built from text every CPython
ships: the prose sentences of the Python language reference (`pydoc_data.topics`, the embedded training corpus
of configs/glm-debug.yaml: a model trained on it has seen these sentences, so its scores measure fit, not
generalisation). The same documents on every run and machine: no download, no randomness.

- lastword: a sentence without its last word (context) and that word (target): LAMBADA's format.
- cloze: the same contexts with four candidate last words, the true one and three other sentences' last words.
- docs: whole paragraphs, for the rolling log-likelihood (perplexity per word and per byte).
"""
from __future__ import annotations

import re

SENTENCE = re.compile(r"[A-Z][A-Za-z ,\-]{30,150}[a-z]\.")
"""A plain prose sentence: letters, spaces, commas and hyphens, ending in a word and a full stop."""
LASTWORD_DOCS, CLOZE_DOCS, DOCS = 64, 48, 16
CHOICES = 4


def sentences() -> list[str]:
    """Every plain prose sentence of the embedded corpus, whitespace collapsed, in corpus order, no repeats."""
    from trainer.data.corpus import embedded_paragraphs

    found: dict[str, None] = {}
    for paragraph in embedded_paragraphs():
        text = " ".join(paragraph.split())
        for candidate in re.split(r"(?<=\.)\s+", text):
            if SENTENCE.fullmatch(candidate) and len(candidate.split()) >= 8:
                found.setdefault(candidate)
    return list(found)


def spread(items: list, count: int) -> list:
    """`count` items taken at even strides over the whole list (the corpus's topics, not its first pages)."""
    stride = max(1, len(items) // count)
    return items[::stride][:count]


def lastword_docs() -> list[dict]:
    """{"context": the sentence up to its last word, "word": the last word} (the full stop dropped)."""
    docs = []
    for sentence in spread(sentences(), LASTWORD_DOCS):
        context, word = sentence[:-1].rsplit(" ", 1)
        docs.append({"context": context, "word": word})
    return docs


def cloze_docs() -> list[dict]:
    """{"context", "choices": CHOICES words, "label": the index of the true one}: the distractors are the last
    words of the following sentences (distinct from the true word), the true word's index cycles 0..3."""
    picked = spread(sentences(), CLOZE_DOCS)
    words = [sentence[:-1].rsplit(" ", 1)[1] for sentence in picked]
    docs = []
    for index, sentence in enumerate(picked):
        context, word = sentence[:-1].rsplit(" ", 1)
        others = [w for w in dict.fromkeys(words[index + 1:] + words[:index]) if w != word][:CHOICES - 1]
        label = index % CHOICES
        docs.append({"context": context, "choices": others[:label] + [word] + others[label:], "label": label})
    return docs


def paragraph_docs() -> list[dict]:
    """{"text": a paragraph of 200 to 600 characters}, whitespace collapsed."""
    from trainer.data.corpus import embedded_paragraphs

    paragraphs = [" ".join(p.split()) for p in embedded_paragraphs()]
    return [{"text": p} for p in spread([p for p in paragraphs if 200 <= len(p) <= 600], DOCS)]
