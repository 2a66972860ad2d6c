"""Log-likelihood of a continuation given a context, in the two layouts a GLM is trained on (GLM-SPEC section 1).

causal (GLM-4's objective, data.modes {causal: 1.0}): [gMASK] <sop> context continuation, scored left to right.
    [gMASK] is Part A (position 0); <sop> and the text one Part B span (position 0, block positions 1, 2, ...),
    so the attention is causal and rope_1d sees the positions 0, 1, 2, ...: transformers' GlmForCausalLM on
    the same tokens.
blank (GLM's cloze method): Part A = [CLS] context [MASK] (bidirectional); Part B = <sop> continuation, every
    Part B token at the mask's position, block positions 1..m:
        log p(continuation) = sum_j log p(c_j | Part A, <sop>, c_<j)
    The mask token is [MASK] (GLM's short blanks) or [gMASK] (its document-level blank, for long continuations).

A request is (context ids, continuation ids), both without special tokens. A context too long for the model's
positions is cut on the left (its start is dropped), as lm-eval's own backends do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.tools.decoding import vocab_logits
from trainer.errors import DataError
from trainer.model.mask import segments_of_sep

LAYOUTS = ("causal", "blank")


@dataclass
class Sample:
    """One request laid out for the model: ids, position ids, block position ids (each [s]), sep = |Part A|;
    the logits at positions first .. first + len(targets) - 1 predict targets."""
    ids: list[int]
    positions: list[int]
    blocks: list[int]
    sep: int
    first: int
    targets: list[int]


def causal_sample(context: list[int], continuation: list[int], tokenizer, max_length: int) -> Sample:
    """[gMASK] <sop> + context + continuation, fed but its last token."""
    start = [tokenizer.gmask_id, tokenizer.sop_id]
    context = context[max(0, len(start) + len(context) + len(continuation) - 1 - max_length):]
    ids = (start + context + continuation)[:-1]
    return Sample(ids, [0] * len(ids), list(range(len(ids))), 1, len(start) + len(context) - 1, continuation)


def blank_sample(context: list[int], continuation: list[int], tokenizer, max_length: int, mask_id: int) -> Sample:
    """Part A = [CLS] context [MASK]; Part B = <sop> + continuation but its last token, at the mask's position."""
    context = context[max(0, len(context) + 2 + len(continuation) - max_length):]
    part_a = [tokenizer.require_cls("GLM's cloze scoring")] + context + [mask_id]
    part_b = [tokenizer.sop_id] + continuation[:-1]
    sep = len(part_a)
    return Sample(part_a + part_b, list(range(sep)) + [sep - 1] * len(part_b),
                  [0] * sep + list(range(1, len(part_b) + 1)), sep, sep, continuation)


def lay_out(context: list[int], continuation: list[int], tokenizer, max_length: int, layout: str,
            mask_id: int) -> Sample:
    """The request as a Sample of the layout; DataError for a continuation that alone exceeds the positions."""
    if not continuation:
        raise DataError("a loglikelihood request has an empty continuation: there is nothing to score")
    room = max_length - 2
    if len(continuation) > room:
        raise DataError(f"a continuation of {len(continuation)} tokens does not fit the model's {max_length} "
                        f"positions (at most {room} with the layout's special tokens)")
    if layout == "causal":
        return causal_sample(context, continuation, tokenizer, max_length)
    return blank_sample(context, continuation, tokenizer, max_length, mask_id)


def collate_samples(samples: list[Sample], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Samples right-padded to the longest: (ids, positions, blocks) [b, s] and segments [b, 2, s]. Padding comes
    after every real token and outside Part A, so no real token attends to it."""
    length = max(len(sample.ids) for sample in samples)

    def padded(field: str, value: int) -> torch.Tensor:
        rows = [getattr(sample, field) + [value] * (length - len(sample.ids)) for sample in samples]
        return torch.tensor(rows, device=device)  # [b, s]

    seps = torch.tensor([sample.sep for sample in samples], device=device)
    return padded("ids", pad_id), padded("positions", 0), padded("blocks", 0), segments_of_sep(seps, length)


@torch.no_grad()
def score_samples(model, samples: list[Sample], pad_id: int, vocab_size: int,
                  tp_group=None) -> list[tuple[float, bool]]:
    """(sum of the targets' log-probabilities, whether every target is the argmax) of each sample, in one forward
    of the batch; the logits are computed (and gathered over tensor ranks) only at the scored positions. The
    forward is a KV-cached step from empty caches, whose mask takes the smallest exact form (GLMMask.cached):
    a causal batch needs none (SDPA's causal kernel), so a long context builds no [s, s] mask; a blank batch
    (Part A bidirectional) the dense rows."""
    device = next(model.parameters()).device
    batch = collate_samples(samples, pad_id, device)
    hidden, weight = model.head_inputs(batch, model.kv_caches())  # [b, s, h], the head's weight
    rows = torch.tensor([b for b, sample in enumerate(samples) for _ in sample.targets], device=device)
    columns = torch.tensor([sample.first + j for sample in samples for j in range(len(sample.targets))], device=device)
    logits = vocab_logits(hidden[rows, columns], weight, vocab_size, tp_group)  # [n, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor([t for sample in samples for t in sample.targets], device=device)
    picked = log_probs.gather(1, targets[:, None])[:, 0]  # [n]
    greedy = log_probs.argmax(dim=-1) == targets
    results, start = [], 0
    for sample in samples:
        end = start + len(sample.targets)
        results.append((float(picked[start:end].sum()), bool(greedy[start:end].all())))
        start = end
    return results
