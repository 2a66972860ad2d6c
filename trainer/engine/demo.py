"""After the single-process main job: a packed training row (where each sample starts, its mode),
and one blank of a training sample filled by the trained model (or, when the data has no blanks: the causal
mode, GLM-4's objective, the start of a training text continued), read back from the checkpoint the run just
saved and decoded exactly as glm-generate does."""
from __future__ import annotations

from pathlib import Path

from trainer.checkpoint.model_source import build_model, read_weights
from trainer.data.packing import OneSamplePerRow, SampleDataset
from trainer.data.prep import describe_row
from trainer.generate import continue_causal, fill_blanks
from trainer.model.config import ModelConfig

ROWS_SEARCHED = 32
"""The demo shows the row with the most samples among the first ROWS_SEARCHED training rows."""


def first_mask_sample(samples: SampleDataset, search: int = 64) -> int:
    """Index of the first sample whose first blank is a short [MASK] span with text before it."""
    mask_id = samples.tokenizer.mask_id
    for index in range(search):
        sample = samples[index]
        part_a = list(sample["input_ids"][: int(sample["sep"])])
        if mask_id in part_a and part_a.index(mask_id) > 8:
            return index
    return 0


def fill_one_blank(checkpoint_dir: Path, model_config: ModelConfig, rows: OneSamplePerRow) -> str:
    """The training row with the most samples among the first ROWS_SEARCHED (its layout only), then the first
    blank of a [MASK] sample: the text around it, the original span and the model's greedy fill (every blank
    of the sample is filled in text order; the first one is shown)."""
    tokenizer = rows.tokenizer
    blanks = {tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id}
    sample_index = first_mask_sample(rows.samples)
    sample = rows.samples[sample_index]
    sep = int(sample["sep"])
    shown = max(range(ROWS_SEARCHED), key=lambda k: (len(rows.members(k)), -k))  # the most samples, first
    layout = "\n".join("  " + line for line in describe_row(rows, shown, text=False))
    if sep == 1:  # a causal sample: Part A is the [gMASK] alone
        demo = continue_one_text(checkpoint_dir, model_config, rows, sample_index)
        return f"a packed training row:\n{layout}\n{demo}"
    part_a = [int(t) for t in sample["input_ids"][:sep]]
    mask_position = next(i for i, t in enumerate(part_a) if t in blanks)
    # The original span: the Part B labels that carry this blank's position, up to its eop.
    original = [int(t) for t, p, m in zip(sample["labels"][sep:], sample["position_ids"][sep:], sample["loss_mask"][sep:])
                if m and p == mask_position and t != tokenizer.eop_id]
    config, weights = read_weights(checkpoint_dir, model_config)
    _, spans = fill_blanks(build_model(config, weights), tokenizer, tokenizer.decode(part_a[1:]),
                           config.max_sequence_length, config.vocab_size,
                           max_new_tokens=max(1, min(32, len(original) + 8)))
    context = tokenizer.decode(part_a[max(0, mask_position - 24): mask_position + 8])
    return (f"a packed training row:\n{layout}\n"
            f"blank-infilling demo (sample {sample_index}, {tokenizer.decode([part_a[mask_position]])}):\n"
            f"  context:  {context!r}\n  original: {tokenizer.decode(original)!r}\n  model:    {tokenizer.decode(spans[0])!r}")


def continue_one_text(checkpoint_dir: Path, model_config: ModelConfig, rows: OneSamplePerRow, index: int,
                      prompt_tokens: int = 16) -> str:
    """Causal sample `index`: its [gMASK] <sop> and first prompt_tokens text tokens, the text that follows and
    the model's greedy continuation of the same length (as glm-generate --causal)."""
    tokenizer, sample = rows.tokenizer, rows.samples[index]
    ids = [int(t) for t in sample["input_ids"][:int(sample["length"])]]
    prompt, original = ids[:2 + prompt_tokens], ids[2 + prompt_tokens:2 + 2 * prompt_tokens]
    config, weights = read_weights(checkpoint_dir, model_config)
    generated = continue_causal(build_model(config, weights), prompt, config.max_sequence_length, config.vocab_size,
                                max(1, len(original)), frozenset({tokenizer.eot_id, tokenizer.eop_id}))
    return (f"causal demo (sample {index}):\n  context:  {tokenizer.decode(prompt[2:])!r}\n"
            f"  original: {tokenizer.decode(original)!r}\n  model:    {tokenizer.decode(generated)!r}")
