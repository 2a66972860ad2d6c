"""The datasets of the local task YAMLs beside this file, for their `custom_dataset: !function` entries (lm-eval
loads such a function from a .py file next to the YAML). The documents are built in trainer/tools/harness/local_data.py."""
from __future__ import annotations

import datasets

from trainer.tools.harness.local_data import cloze_docs, lastword_docs, paragraph_docs


def lastword(**_metadata) -> dict:
    return {"test": datasets.Dataset.from_list(lastword_docs())}


def cloze(**_metadata) -> dict:
    return {"test": datasets.Dataset.from_list(cloze_docs())}


def docs(**_metadata) -> dict:
    return {"test": datasets.Dataset.from_list(paragraph_docs())}
