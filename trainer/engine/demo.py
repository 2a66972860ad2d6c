"""After the single-process main job: show one blank of a held-out-style sample filled by the model."""
from __future__ import annotations

from typing import Callable

import torch

from trainer.data.dataset import GLMDataset
from trainer.model.embedding import tied_logits


@torch.no_grad()
def greedy_fill(logits_fn: Callable, part_a: list[int], mask_position: int, sop_id: int, eop_id: int,
                max_new_tokens: int, device) -> list[int]:
    """Generate the span of the blank at `mask_position` left to right (GLM Part B, no KV cache):
    the span's tokens take the blank's position id and block positions 1, 2, ..."""
    generated: list[int] = []
    sep = len(part_a)
    for _ in range(max_new_tokens):
        part_b = [sop_id] + generated
        ids = torch.tensor([part_a + part_b], device=device)
        positions = torch.tensor([list(range(sep)) + [mask_position] * len(part_b)], device=device)
        blocks = torch.tensor([[0] * sep + list(range(1, len(part_b) + 1))], device=device)
        logits = logits_fn((ids, positions, blocks, torch.tensor([sep], device=device)))
        token = int(logits[0, -1].float().argmax())
        if token == eop_id:
            break
        generated.append(token)
    return generated


def first_mask_sample(dataset: GLMDataset, search: int = 64) -> int:
    """Index of the first sample whose first blank is a short [MASK] span with text before it."""
    mask_id = dataset.tokenizer.mask_id
    for index in range(search):
        part_a = list(dataset[index]["input_ids"][: int(dataset[index]["sep"])])
        if mask_id in part_a and part_a.index(mask_id) > 8:
            return index
    return 0


def fill_one_blank(module: torch.nn.Module, dataset: GLMDataset) -> str:
    """Decode the first blank of a [MASK] sample: the text around it, the original span and the model's fill.
    `module` is the one-stage pipeline, whose output is (hidden, tied output weight)."""
    tokenizer = dataset.tokenizer
    blanks = {tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id}
    sample_index = first_mask_sample(dataset)
    sample = dataset[sample_index]
    sep = int(sample["sep"])
    part_a = [int(t) for t in sample["input_ids"][:sep]]
    mask_position = next(i for i, t in enumerate(part_a) if t in blanks)
    # The original span: the Part B labels that carry this blank's position, up to its eop.
    original = [int(t) for t, p, m in zip(sample["labels"][sep:], sample["position_ids"][sep:], sample["loss_mask"][sep:])
                if m and p == mask_position and t != tokenizer.eop_id]
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    fill = greedy_fill(lambda inputs: tied_logits(*module(inputs)), part_a, mask_position, tokenizer.sop_id, tokenizer.eop_id,
                       max_new_tokens=max(1, min(32, len(original) + 8)), device=device)
    module.train(was_training)
    context = tokenizer.decode(part_a[max(0, mask_position - 24): mask_position + 8])
    return (f"blank-infilling demo (sample {sample_index}, {tokenizer.decode([part_a[mask_position]])}):\n"
            f"  context:  {context!r}\n  original: {tokenizer.decode(original)!r}\n  model:    {tokenizer.decode(fill)!r}")
