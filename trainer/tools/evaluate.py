"""glm-eval: cloze classification with verbalizers (GLM's fine-tuning format), reporting accuracy.

    glm-eval SOURCE --data task.jsonl --template "{text} It was [MASK]." \
             --verbalizers '{"positive": " great", "negative": " terrible"}'

Each JSONL record fills the template (str.format with its fields) into a text with exactly one [MASK],
and names its class in "label". A class c with verbalizer tokens v_1..v_m is scored by the likelihood of
its word filling the blank, as GLM's Part B:
    score(c) = sum_j log p(v_j | Part A, [sop], v_<j)      (position id = the mask's, block ids 1..m)
and the prediction is argmax_c score(c). `--harness TASKS` runs lm-evaluation-harness tasks instead
(trainer/tools/harness/cli.py, docs/EVALUATION.md). Under a launcher (WORLD_SIZE = tp ranks) the vocabulary-parallel
logits are gathered before the softmax, so every rank scores the same.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from trainer.errors import ConfigError, DataError, OneLineParser, exits_on_error, read_user_text
from trainer.tools.harness.cli import add_harness_arguments, run_harness
from trainer.tools.source_args import add_source_arguments, load_source_model


@torch.no_grad()
def score_labels(model, tokenizer, text: str, words: dict[str, list[int]], vocab_size: int,
                 tp_group=None, max_sequence_length: Optional[int] = None) -> dict[str, float]:
    """{class: sum of log-probabilities of its verbalizer tokens filling the text's one [MASK]};
    max_sequence_length (the model's positions) refuses a text and verbalizer that do not fit. Part A runs once,
    filling the KV caches (no mask: it is bidirectional); each class's Part B, [sop] + word[:-1], then runs on a
    fork of them (a causal bias), its m rows of logits only: a long text builds no [s, s] mask nor [s, V] logits."""
    from trainer.tools.decoding import encode_prompt, step_inputs, vocab_logits  # the model only once one is scored

    part_a, masks = encode_prompt(text, tokenizer)
    if len(masks) != 1 or part_a[masks[0]] != tokenizer.mask_id:
        raise DataError(f"a cloze text needs exactly one [MASK] and no other blank, got {text!r}")
    longest = len(part_a) + max(len(word) for word in words.values())  # Part A, sop, the word but its last token
    if max_sequence_length is not None and longest > max_sequence_length:
        raise DataError(f"the cloze text and its longest verbalizer need {longest} positions but the model holds "
                        f"{max_sequence_length}: shorten the text ({text[:40]!r}...)")
    sep = len(part_a)
    caches = model.kv_caches()
    model.head_inputs(step_inputs(model, part_a, list(range(sep)), [0] * sep, sep), caches)
    scores = {}
    for label, word in words.items():
        part_b = [tokenizer.sop_id] + word[:-1]
        inputs = step_inputs(model, part_b, [masks[0]] * len(part_b), list(range(1, len(part_b) + 1)), sep)
        hidden, weight = model.head_inputs(inputs, [cache.fork() for cache in caches])  # [1, m, h]
        log_probs = torch.log_softmax(vocab_logits(hidden[0], weight, vocab_size, tp_group), dim=-1)  # [m, V]
        scores[label] = float(log_probs.gather(1, torch.tensor(word, device=hidden.device)[:, None]).sum())
    return scores


def evaluate_cloze(model, tokenizer, records: list[dict], template: str, verbalizers: dict[str, str],
                   vocab_size: int, tp_group=None, max_sequence_length: Optional[int] = None) -> dict:
    """Accuracy of argmax-likelihood classification over the records."""
    words = {label: tokenizer.encode(word) for label, word in verbalizers.items()}
    if any(not word for word in words.values()):
        raise DataError("every verbalizer must encode to at least one token")
    correct = 0
    for number, record in enumerate(records, 1):
        try:
            text, label = template.format(**record), record["label"]
        except KeyError as missing:
            raise DataError(f"record {number} has no field {missing}: the template and 'label' need it") from None
        except (ValueError, IndexError) as error:
            raise DataError(f"--template {template!r} is not a str.format template with named fields ({error})") from None
        if label not in words:
            raise DataError(f"record {number} has label {label!r}, which has no verbalizer ({', '.join(words)})")
        scores = score_labels(model, tokenizer, text, words, vocab_size, tp_group, max_sequence_length)
        correct += max(scores, key=scores.get) == label
    return {"accuracy": correct / len(records), "correct": correct, "examples": len(records)}


def read_records(path: Path) -> list[dict]:
    """The task's records, one JSON object per line, each with a string `label`."""
    text = read_user_text(path, "task file")
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"task file {path} is not JSON lines: line {number}: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("label", ""), str):
            raise DataError(f"task file {path} line {number} is {type(record).__name__} {line[:40]!r}: each line "
                            f"must be a JSON object of the template's fields and a string 'label'")
        records.append(record)
    if not records:
        raise DataError(f"task file {path} holds no records")
    return records


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog="glm-eval", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--data", type=Path, help="JSONL task: template fields and 'label'")
    parser.add_argument("--template", default="{text}", help="str.format template with one [MASK]")
    parser.add_argument("--verbalizers", help='JSON {label: word}, e.g. {"yes": " yes", "no": " no"}')
    add_harness_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.harness is not None:
        return run_harness(args)
    if args.data is None or args.verbalizers is None:
        raise ConfigError("glm-eval needs --data and --verbalizers (a cloze task), or --harness TASKS")
    try:
        verbalizers = json.loads(args.verbalizers)
    except json.JSONDecodeError:
        raise ConfigError(f"--verbalizers is not JSON: {args.verbalizers!r}") from None
    if not isinstance(verbalizers, dict) or len(verbalizers) < 2 \
            or not all(isinstance(word, str) for word in verbalizers.values()):
        raise ConfigError('--verbalizers must map at least two labels to words (strings), e.g. '
                          '{"yes": " yes", "no": " no"}')
    records = read_records(args.data)
    model, config, tokenizer, tp_group = load_source_model(args)
    result = evaluate_cloze(model, tokenizer, records, args.template, verbalizers, config.vocab_size, tp_group,
                            config.max_sequence_length)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
