"""After the single-process main job, what shows that the model learned: a packed training row (where each
sample starts, its mode); the held-out perplexity of the model read back from the checkpoint the run just
saved, beside a unigram model's on the same tokens; and blanks of held-out samples filled by the model (or,
when the data has no blanks, the causal mode, GLM-4's objective: the start of held-out texts continued),
decoded exactly as glm-generate does.

The unigram baseline is what a model that learned only token frequencies would score: the frequencies of the
target tokens of the training rows the run consumed, add-one smoothed over the true vocabulary. Both
perplexities are exp(mean NLL) over every loss token of the validation rows an evaluation scores
(engine/loop.py validation_rows: the model's is the run's last valid_ppl).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from trainer.checkpoint.model_source import build_model, read_weights
from trainer.config import Config
from trainer.data.dataset import collate
from trainer.data.packing import OneSamplePerRow, SampleDataset, build_sequences
from trainer.data.prep import describe_row
from trainer.engine.loop import pipeline_format, validation_rows
from trainer.tools.decoding import continue_causal, fill_blanks
from trainer.parallel.cross_entropy import vocab_parallel_cross_entropy

ROWS_SEARCHED = 32
"""The demo shows the row with the most samples among the first ROWS_SEARCHED training rows."""
BLANKS_SHOWN = 3
BATCH = 16


def mask_samples(samples: SampleDataset, count: int, search: int = 128) -> list[int]:
    """Indices of the first `count` samples whose first blank is a short [MASK] span with text before it."""
    mask_id, found = samples.tokenizer.mask_id, []
    for index in range(min(search, len(samples))):
        part_a = list(samples[index]["input_ids"][: int(samples[index]["sep"])])
        if mask_id in part_a and part_a.index(mask_id) > 8:
            found.append(index)
            if len(found) == count:
                break
    return found


def unigram_log_probs(rows: OneSamplePerRow, consumed: int, vocab_size: int) -> np.ndarray:
    """log p(token) of the target tokens of training rows [0, consumed), add-one smoothed: [V]."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for row in range(consumed):
        item = rows[row]
        counts += np.bincount(item["labels"][item["loss_mask"] != 0], minlength=vocab_size)[:vocab_size]
    return np.log(counts / counts.sum())


def held_out_perplexities(model, valid: OneSamplePerRow, rows: range, unigram: np.ndarray,
                          vocab_size: int) -> tuple[float, float, int]:
    """(model perplexity, unigram perplexity, loss tokens) over the validation rows `rows`."""
    model_nll = unigram_nll = 0.0
    tokens = 0
    for first in range(rows.start, rows.stop, BATCH):
        batch = collate([valid[row] for row in range(first, min(first + BATCH, rows.stop))])
        inputs, (labels, loss_mask) = pipeline_format(batch)
        with torch.no_grad():
            per_token = vocab_parallel_cross_entropy(model(*inputs), labels, None, vocab_size=vocab_size)  # [b, s]
        counted = loss_mask != 0
        model_nll += float(per_token[counted].double().sum())
        unigram_nll += float(-unigram[labels[counted].numpy()].sum())
        tokens += int(counted.sum())
    return math.exp(model_nll / tokens), math.exp(unigram_nll / tokens), tokens


def fill_held_out_blank(model, samples: SampleDataset, index: int, max_sequence_length: int, vocab_size: int) -> str:
    """The first blank of sample `index`: the text around it, the original span and the model's greedy fill
    (every blank of the sample is filled in text order; the first one is shown)."""
    tokenizer = samples.tokenizer
    blanks = {tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id}
    sample = samples[index]
    sep = int(sample["sep"])
    part_a = [int(t) for t in sample["input_ids"][:sep]]
    mask_position = next(i for i, t in enumerate(part_a) if t in blanks)
    # The original span: the Part B labels that carry this blank's position, up to its eop.
    original = [int(t) for t, p, m in zip(sample["labels"][sep:], sample["position_ids"][sep:], sample["loss_mask"][sep:])
                if m and p == mask_position and t != tokenizer.eop_id]
    _, spans = fill_blanks(model, tokenizer, tokenizer.decode(part_a[1:]), max_sequence_length, vocab_size,
                           max_new_tokens=max(1, min(32, len(original) + 8)))
    context = tokenizer.decode(part_a[max(0, mask_position - 24): mask_position + 8])
    return (f"  context:  {context!r}\n  original: {tokenizer.decode(original)!r}\n"
            f"  model:    {tokenizer.decode(spans[0])!r}")


def continue_held_out_text(model, samples: SampleDataset, index: int, max_sequence_length: int, vocab_size: int,
                           prompt_tokens: int = 16) -> str:
    """Causal sample `index`: its [gMASK] <sop> and first prompt_tokens text tokens, the text that follows and
    the model's greedy continuation of the same length (as glm-generate --causal)."""
    tokenizer, sample = samples.tokenizer, samples[index]
    ids = [int(t) for t in sample["input_ids"][:int(sample["length"])]]
    prompt, original = ids[:2 + prompt_tokens], ids[2 + prompt_tokens:2 + 2 * prompt_tokens]
    generated = continue_causal(model, prompt, max_sequence_length, vocab_size, max(1, len(original)),
                                frozenset(tokenizer.stop_ids))
    return (f"  context:  {tokenizer.decode(prompt[2:])!r}\n  original: {tokenizer.decode(original)!r}\n"
            f"  model:    {tokenizer.decode(generated)!r}")


def show_what_was_learned(checkpoint_dir: Path, config: Config, rows: OneSamplePerRow, consumed: int) -> str:
    """The demo's text: a packed row's layout, the held-out perplexities, and BLANKS_SHOWN held-out fills."""
    model_config, weights = read_weights(checkpoint_dir, config.model)
    model = build_model(model_config, weights)
    shown = max(range(ROWS_SEARCHED), key=lambda k: (len(rows.members(k)), -k))  # the most samples, first
    layout = "\n".join("  " + line for line in describe_row(rows, shown, text=False))
    lines = [f"a packed training row:\n{layout}"]
    if config.data.valid_fraction == 0:
        return "\n".join(lines + ["no held-out split (data.valid_fraction is 0): set it to see the model's "
                                  "held-out perplexity and blanks of text it never trained on"])
    scored = build_sequences(config.data, config.train.seed, split="valid")  # the rows the loop evaluates
    valid = OneSamplePerRow(scored.samples, config.data.seq_length)
    unigram = unigram_log_probs(rows, consumed, model_config.vocab_size)
    held_out = validation_rows(config)
    ppl, unigram_ppl, tokens = held_out_perplexities(model, scored, held_out, unigram, model_config.vocab_size)
    lines.append(f"held-out perplexity ({len(held_out)} validation rows, {tokens} loss tokens: what valid_ppl "
                 f"measures): model {ppl:.1f}, unigram baseline {unigram_ppl:.1f} (token frequencies of the "
                 f"{consumed} training rows, add-one smoothed)")
    shape = (model_config.max_sequence_length, model_config.vocab_size)
    for index in mask_samples(valid.samples, BLANKS_SHOWN):
        lines.append(f"blank-infilling demo (held-out sample {index}):\n"
                     + fill_held_out_blank(model, valid.samples, index, *shape))
    causal = [i for i in range(min(64, len(valid.samples))) if int(valid.samples[i]["sep"]) == 1][:BLANKS_SHOWN]
    for index in causal if len(lines) == 2 else []:  # no [MASK] blank to show: the data is causal
        lines.append(f"causal demo (held-out sample {index}):\n"
                     + continue_held_out_text(model, valid.samples, index, *shape))
    return "\n".join(lines)
