"""Decoding with GLM: blank infilling and GLM-4's left-to-right continuation, with a per-block KV cache or by
recomputing the whole sequence (the same tokens either way), greedy or top-p. The computations of glm-generate
(trainer/tools/generate.py, the command), glm-eval and the main job's demo.

Blank infilling: Part A = [CLS] + the text, each [MASK] / [sMASK] / [gMASK] marker one mask token (a text
without a marker gets [gMASK] appended: continue after it). Part A positions 0..sep-1, block positions 0. The
blanks are filled in text order, each as Part B: [sop] + generated tokens with position id = the mask's
position and block positions 1, 2, ..., until [eop]; a later blank sees the earlier fills (Part B is causal).
With the KV cache every step feeds only the new token; the keys and values of all earlier positions are kept
per block, which equals recomputing the whole sequence. Under tensor parallelism the vocabulary-sharded logits
are gathered and every rank samples the same token from the same seeded generator.

Causal (ChatGLM2/3, GLM-4): [gMASK] <sop> + the text, generated left to right until <|endoftext|> or
<|endofpiece|>. [gMASK] is Part A (position 0) and everything after it one Part B span (position 0, block
positions 1, 2, ...), so rope_1d sees the positions 0, 1, 2, ... of a causal language model and the mask is
causal: the same computation as transformers' GlmForCausalLM.

Chat (GLM-4): one user turn in the chat layout the trainer fine-tunes on (data.instruction_format chat,
trainer/data/instruction.py), [gMASK] <sop> <|user|> \\n prompt <|assistant|> \\n, continued causally: the reply
is what follows, until <|endoftext|> or a role token (tokenizer.stop_ids). GLM-4's own chat template ends the
prompt at <|assistant|> and the model writes the newline itself; the prompt here carries it, as the training
layout does (its loss starts at the reply), so a model fine-tuned here and an imported GLM-4 both reply directly.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from trainer.data.instruction import chat_turns
from trainer.errors import DataError
from trainer.model.mask import segments_of_sep
from trainer.model.output import vocab_parallel_logits
from trainer.parallel.mappings import gather_from_tp

MARKERS = re.compile(r"(\[MASK\]|\[sMASK\]|\[gMASK\])")
Step = Callable[[list[int], list[int], list[int]], torch.Tensor]
"""Feed new (ids, position ids, block position ids) -> the full-vocabulary logits [V] after the last one."""


def encode_prompt(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Text with mask markers -> (Part A ids, the positions of its mask tokens in text order)."""
    if not MARKERS.search(text):
        text += "[gMASK]"
    marker_ids = {"[MASK]": tokenizer.mask_id, "[sMASK]": tokenizer.smask_id, "[gMASK]": tokenizer.gmask_id}
    part_a, masks = [tokenizer.require_cls("blank infilling")], []
    for piece in MARKERS.split(text):
        if piece in marker_ids:
            masks.append(len(part_a))
            part_a.append(marker_ids[piece])
        elif piece:
            part_a += tokenizer.encode(piece)
    return part_a, masks


def vocab_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """The output head's hand-over (hidden [..., h], this rank's output weight) -> fp32 logits over the true
    vocabulary [..., V], gathered over tp ranks."""
    return gather_from_tp(vocab_parallel_logits(hidden, weight, tp_group), tp_group)[..., :vocab_size].float()


def next_token_logits(model, inputs: tuple, vocab_size: int, tp_group, kv_caches=None) -> torch.Tensor:
    """The model's pieces (GLMModel, or the engine's GLMTrainModel in the loop) on (ids, position ids, block
    position ids [1, s], segments [1, 2, s]), with its KV caches if given -> fp32 logits over the true vocabulary
    at the last position only [V], gathered over tp ranks: a prompt of s tokens gets one row of logits, not an
    [s, V] tensor (6.6 GB at s = 32768 and V = 50304 in fp32)."""
    hidden, weight = model.head_inputs(inputs, kv_caches)  # [1, s, h]
    return vocab_logits(hidden[0, -1], weight, vocab_size, tp_group)


def step_inputs(model, ids: list[int], positions: list[int], blocks: list[int], sep: int) -> tuple:
    """One row of ids, position ids, block position ids (a step's new positions) and the row's |Part A| -> the
    model's inputs [1, s], segments [1, 2, s] (one sample: segments_of_sep)."""
    device = next(model.parameters()).device
    ids_t, pos_t, block_t = (torch.tensor([x], device=device) for x in (ids, positions, blocks))  # [1, s]
    return ids_t, pos_t, block_t, segments_of_sep(torch.tensor([sep], device=device), len(ids))


def cached_step(model, sep: int, vocab_size: int, tp_group=None) -> Step:
    """A Step that keeps one KVCache per block (GLMModel.kv_caches) and runs only the new positions."""
    caches = model.kv_caches()

    def step(ids: list[int], positions: list[int], blocks: list[int]) -> torch.Tensor:
        return next_token_logits(model, step_inputs(model, ids, positions, blocks, sep), vocab_size, tp_group, caches)

    return step


def recompute_step(model, sep: int, vocab_size: int, tp_group=None) -> Step:
    """A Step that reruns GLMModel over the whole sequence so far (the reference for the cache)."""
    context: list[list[int]] = [[], [], []]

    def step(ids: list[int], positions: list[int], blocks: list[int]) -> torch.Tensor:
        for held, new in zip(context, (ids, positions, blocks)):
            held += new
        return next_token_logits(model, step_inputs(model, *context, sep), vocab_size, tp_group)

    return step


def causal_prompt(text: str, tokenizer) -> list[int]:
    """GLM-4's prompt: [gMASK] <sop> + the text (no markers: it is continued, not infilled)."""
    return [tokenizer.gmask_id, tokenizer.sop_id] + tokenizer.encode(text)


def chat_prompt(text: str, tokenizer) -> list[int]:
    """GLM-4's chat prompt of one user turn: the training chat layout's ids up to the reply (module docstring)."""
    user_turn, assistant_turn = chat_turns(tokenizer)
    return user_turn + tokenizer.encode(text) + assistant_turn


@torch.no_grad()
def continue_causal(model, prompt: list[int], max_sequence_length: int, vocab_size: int, max_new_tokens: int,
                    stop_ids: frozenset[int] = frozenset(), top_p: float = 0.0, temperature: float = 1.0,
                    seed: int = 0, use_cache: bool = True, tp_group=None) -> list[int]:
    """The tokens generated after `prompt` (its first token the one-token Part A, e.g. [gMASK]; the rest
    Part B at position 0, block positions 1, 2, ...), until a token of stop_ids (not returned) or
    max_new_tokens."""
    n = len(prompt)
    if n + max_new_tokens > max_sequence_length:
        raise DataError(f"a prompt of {n} tokens plus {max_new_tokens} new ones exceeds the model's "
                        f"{max_sequence_length} positions: shorten it or lower --max-new-tokens")
    step = (cached_step if use_cache else recompute_step)(model, 1, vocab_size, tp_group)
    generator = torch.Generator().manual_seed(seed)
    logits = step(prompt, [0] * n, list(range(n)))
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        token = sample(logits, top_p, temperature, generator)
        if token in stop_ids:
            break
        generated.append(token)
        logits = step([token], [0], [n + len(generated) - 1])
    return generated


def sample(logits: torch.Tensor, top_p: float, temperature: float, generator: torch.Generator) -> int:
    """Greedy (top_p = 0) or nucleus sampling: the smallest set of most likely tokens whose probability
    reaches top_p, renormalised. The same generator state on every tp rank gives the same token."""
    if top_p <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the token that crosses top_p is kept
    kept = sorted_probs * keep
    choice = torch.multinomial((kept / kept.sum()).cpu(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def fill_blanks(model, tokenizer, text: str, max_sequence_length: int, vocab_size: int, max_new_tokens: int = 32,
                top_p: float = 0.0, temperature: float = 1.0, seed: int = 0, use_cache: bool = True,
                tp_group=None) -> tuple[str, list[list[int]]]:
    """The text with every blank filled, and the generated ids of each blank."""
    part_a, masks = encode_prompt(text, tokenizer)
    sep = len(part_a)
    if sep > max_sequence_length:
        raise DataError(f"the prompt is {sep} tokens but the model holds {max_sequence_length} positions: shorten it")
    step = (cached_step if use_cache else recompute_step)(model, sep, vocab_size, tp_group)
    generator = torch.Generator().manual_seed(seed)
    step(part_a, list(range(sep)), [0] * sep)  # Part A fills the caches
    spans = []
    # Block positions 1, 2, ... index a learned table of max_sequence_length rows: a span fed up to block
    # position longest fits it whatever --max-new-tokens asks.
    longest = min(max_new_tokens, max_sequence_length - 1)
    for position in masks:
        span: list[int] = []
        logits = step([tokenizer.sop_id], [position], [1])
        while True:
            token = sample(logits, top_p, temperature, generator)
            if token == tokenizer.eop_id:
                break
            span.append(token)
            if len(span) == longest:
                break
            logits = step([token], [position], [len(span) + 1])
        spans.append(span)
    pieces, previous = [], 1
    for position, span in zip(masks, spans):
        pieces.append(tokenizer.decode(part_a[previous:position]) + tokenizer.decode(span))
        previous = position + 1
    return "".join(pieces) + tokenizer.decode(part_a[previous:]), spans
