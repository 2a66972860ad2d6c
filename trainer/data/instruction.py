"""Instruction samples: prompt/response records in GLM's generation ([gMASK]) format or GLM-4's chat layout.

A record with prompt tokens p (|p| = P, history already folded in by format_prompt) and response tokens r
(|r| = R) becomes, in data.instruction_format `glm`,
    Part A = [CLS] + p + [gMASK]                          sep = P + 2, positions 0..sep-1, block positions 0
    Part B = input [sop] + r, target r + [eop]            positions sep-1 (the [gMASK]), block positions 1..R+1
so the sample holds P + R + 3 tokens and the loss covers exactly r and [eop]. It is assemble()'s [gMASK]
sample of the text p + r with the blank over r: the same arrays blank infilling makes.
In `chat` (GLM-4's layout, causal like the causal mode: Part A = [gMASK] alone, everything after it at position
0 with block positions 1, 2, ...):
    [gMASK] <sop> <|user|> \\n p <|assistant|> \\n r       target: the next token, <|endoftext|> after r
with the loss on exactly the positions that predict r and the <|endoftext|> (the prompt is context only).

Too long (P + R + extra > seq_length, extra = 3 in `glm`, the role and newline tokens in `chat`): the prompt is
cut to seq_length - extra - R tokens, from the left (keeping its end, next to the response; the default) or
from the right (data.instruction_truncation). The response is never cut; a record whose response alone does
not fit is refused when the dataset is built.

Storage (glm-prep --instructions): record k is documents 2k (the formatted prompt) and 2k + 1 (the response)
of PREFIX.bin/.idx, and PREFIX.instructions.json marks the prefix as instruction data.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trainer.data.blank_infilling import assemble
from trainer.data.config import DataConfig
from trainer.data.corpus import json_lines
from trainer.data.indexed import IndexedDataset
from trainer.data.sequences import GLMDataset
from trainer.data.tokenizer import GLMTokenizer
from trainer.errors import DataError
from trainer.paths import temporary_beside

logger = logging.getLogger(__name__)
MARKER_SUFFIX = ".instructions.json"
FORMAT = "glm-instructions"
EXTRA_TOKENS = 3
"""[CLS], [gMASK] and sop (eop is the target of the last Part B position, not an extra position)."""


def marker_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}{MARKER_SUFFIX}")


def is_instruction_prefix(prefix: str | os.PathLike) -> bool:
    return marker_path(prefix).is_file()


def format_prompt(prompt: str, history: list) -> str:
    """The text of Part A. Without history: the prompt as it is. With history [[q1, a1], ...]: every earlier
    turn as "Q: q\\nA: a\\n", then "Q: prompt\\nA:" (the response follows the final "A:"). One space follows
    "A:" whether or not the earlier answer starts with one (responses usually do: " Paris.")."""
    if not history:
        return prompt
    turns = "".join(f"Q: {query}\nA: {answer.lstrip(' ')}\n" for query, answer in history)
    return f"{turns}Q: {prompt}\nA:"


def _record(line: str, where: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where} is not valid JSON ({error.msg}): one object per line, e.g. "
                        f"{{\"prompt\": \"...\", \"response\": \"...\"}}") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "response")):
        raise DataError(f"{where} needs string fields \"prompt\" and \"response\" (optionally \"history\": "
                        f"[[prompt, response], ...])")
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history):
        raise DataError(f"{where} has a \"history\" that is not a list of [prompt, response] string pairs")
    if not record["response"]:
        raise DataError(f"{where} has an empty \"response\": there is nothing to learn; remove the record")
    return format_prompt(record["prompt"], history), record["response"]


def read_instructions(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(formatted prompt, response) of every JSON line of `path`, in file order; blank lines skipped."""
    records = 0
    for where, line in json_lines(path):
        records += 1
        yield _record(line, where)
    if records == 0:
        raise DataError(f"input {path} holds no instruction records: one {{\"prompt\", \"response\"}} object per line")


def write_marker(prefix: str | os.PathLike, records: int) -> None:
    """PREFIX.instructions.json, atomically (temporary file + os.replace)."""
    final = marker_path(prefix)
    tmp = temporary_beside(final)
    tmp.write_text(json.dumps({"format": FORMAT, "version": 1, "records": records}))
    os.replace(tmp, final)


def as_documents(records: Iterable[tuple[str, str]]) -> Iterator[str]:
    """(prompt, response) pairs -> prompt, response, prompt, ... (record k = documents 2k and 2k + 1)."""
    for prompt, response in records:
        yield prompt
        yield response


def kept_prompt_length(prompt_length: np.ndarray | int, response_length: np.ndarray | int, seq_length: int,
                       extra: int = EXTRA_TOKENS):
    """Prompt tokens that fit beside the whole response: min(P, seq_length - extra - R)."""
    return np.minimum(prompt_length, seq_length - extra - np.asarray(response_length))


def chat_turns(tokenizer: GLMTokenizer) -> tuple[list[int], list[int]]:
    """The ids around one turn's prompt in GLM-4's chat layout: (user_turn = [gMASK] <sop> <|user|> \\n,
    assistant_turn = <|assistant|> \\n); the response follows. glm-generate --chat prompts with
    user_turn + prompt + assistant_turn (trainer/tools/decoding.py)."""
    roles = tokenizer.role_ids
    if not {"<|user|>", "<|assistant|>"} <= set(roles):
        raise DataError("GLM-4's chat layout needs a GLM-4-style tokenizer with the role tokens <|user|> and "
                        "<|assistant|>: use the model's tokenizer.json (or, for training, instruction_format glm)")
    newline = tokenizer.encode("\n")
    return [tokenizer.gmask_id, tokenizer.sop_id, roles["<|user|>"], *newline], [roles["<|assistant|>"], *newline]


def chat_sample(prompt: np.ndarray, response: np.ndarray, user_turn: list[int], assistant_turn: list[int],
                tokenizer: GLMTokenizer, seq_length: int) -> dict:
    """GLM-4's chat layout (module docstring) around the ids of chat_turns."""
    ids = np.concatenate([user_turn, prompt, assistant_turn, response]).astype(np.int64)  # [T]
    total = len(ids)
    labels = np.append(ids[1:], tokenizer.eot_id)  # [T]: the next token, <|endoftext|> after the response
    counted = np.arange(total) >= total - len(response) - 1  # the positions predicting r and <|endoftext|>
    sample = {"input_ids": ids, "labels": np.where(counted, labels, tokenizer.pad_id),
              "loss_mask": counted.astype(np.int64), "position_ids": np.zeros(total, dtype=np.int64),
              "block_position_ids": np.arange(total, dtype=np.int64)}
    for key, values in sample.items():
        array = np.full(seq_length, tokenizer.pad_id if key in ("input_ids", "labels") else 0, dtype=np.int64)
        array[:total] = values
        sample[key] = array
    sample["sep"], sample["length"] = 1, total
    return sample


class InstructionFormat:
    """(prompt tokens, response tokens) -> one sample of seq_length in `layout` (glm or chat), the prompt
    truncated if needed; extra_tokens: the positions a sample adds to P + R."""

    def __init__(self, tokenizer: GLMTokenizer, seq_length: int, truncation: str = "left", layout: str = "glm"):
        self.tokenizer, self.seq_length, self.truncation, self.layout = tokenizer, seq_length, truncation, layout
        if layout == "chat":
            self.user_turn, self.assistant_turn = chat_turns(tokenizer)
            self.extra_tokens = len(self.user_turn) + len(self.assistant_turn)
        else:
            self.extra_tokens = EXTRA_TOKENS

    def __call__(self, prompt: np.ndarray, response: np.ndarray) -> dict:
        prompt, response = np.asarray(prompt, dtype=np.int64), np.asarray(response, dtype=np.int64)
        keep = int(kept_prompt_length(len(prompt), len(response), self.seq_length, self.extra_tokens))
        if keep < 0:
            raise DataError(f"a response of {len(response)} tokens does not fit data.seq_length={self.seq_length} "
                            f"(it needs {len(response) + self.extra_tokens}): raise data.seq_length")
        if keep < len(prompt):
            if self.truncation == "error":
                raise DataError(f"an instruction record of {len(prompt) + len(response) + self.extra_tokens} tokens "
                                f"exceeds data.seq_length={self.seq_length} and data.instruction_truncation is 'error'")
            prompt = prompt[len(prompt) - keep:] if self.truncation == "left" else prompt[:keep]
        if self.layout == "chat":
            return chat_sample(prompt, response, self.user_turn, self.assistant_turn, self.tokenizer, self.seq_length)
        text = np.concatenate([prompt, response])
        return assemble(text, [(len(prompt), len(text))], self.tokenizer.gmask_id, np.zeros(1, dtype=np.int64),
                        self.tokenizer, self.seq_length)


class InstructionDataset(GLMDataset):
    """`ds[i]` is the instruction sample of global index i: record i % N of epoch i // N's order (the same
    seeded permutation and wrap-around as GLMDataset). A sequence here is one record: starts..bounds is the
    prompt, bounds..ends the response, in stream coordinates. No randomness beyond the order."""

    def __init__(self, indexed: IndexedDataset, tokenizer: GLMTokenizer, formatter: InstructionFormat,
                 starts: np.ndarray, bounds: np.ndarray, ends: np.ndarray, seed: int, split: str):
        super().__init__(indexed, tokenizer, formatter, starts, ends, seed, split)
        self.bounds = bounds

    def record(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt tokens, response tokens) of global sample `index` (views of the corpus)."""
        s = self.sequence_number(index)
        tokens = self.indexed.tokens
        return tokens[self.starts[s]: self.bounds[s]], tokens[self.bounds[s]: self.ends[s]]

    def __getitem__(self, index: int) -> dict:
        return self.infilling(*self.record(index))

    def sample_length(self, index: int) -> int:
        """`self[index]["length"]`: the record's kept prompt and response plus the format's extra tokens."""
        s = self.sequence_number(index, announce=False)
        prompt, response = self.bounds[s] - self.starts[s], self.ends[s] - self.bounds[s]
        extra = self.infilling.extra_tokens
        return int(kept_prompt_length(prompt, response, self.infilling.seq_length, extra) + response) + extra

    def source_tokens(self) -> np.ndarray:
        """Corpus tokens each record's sample carries after truncation: kept prompt + response.  # [N]"""
        prompt, response = self.bounds - self.starts, self.ends - self.bounds
        return kept_prompt_length(prompt, response, self.infilling.seq_length, self.infilling.extra_tokens) + response


def check_marker(indexed: IndexedDataset) -> int:
    """The number of records the marker promises, checked against the .idx (two documents per record)."""
    path = marker_path(indexed.prefix)
    try:
        meta = json.loads(path.read_text())
        records = int(meta["records"])
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path} is not a glm-prep instruction marker: rerun glm-prep --instructions") from None
    if meta.get("format") != FORMAT or len(indexed) != 2 * records:
        raise DataError(f"{path} promises {records} instruction records but {indexed.prefix}.idx holds {len(indexed)} "
                        f"documents (two per record): the files come from different runs; rerun glm-prep --instructions")
    return records


def build_instruction_dataset(indexed: IndexedDataset, tokenizer: GLMTokenizer, data: DataConfig, seed: int,
                              split: str) -> InstructionDataset:
    """The instruction records of `split` ("valid" = the last data.valid_fraction of them). Refuses records
    whose response does not fit data.seq_length; logs how many prompts are truncated."""
    records = check_marker(indexed)
    offsets = np.asarray(indexed.offsets, dtype=np.int64)
    starts, bounds, ends = offsets[0:-1:2], offsets[1::2], offsets[2::2]  # [records] each
    held_out = 0 if data.valid_fraction == 0 else max(1, round(data.valid_fraction * records))
    if split == "valid" and held_out == 0:
        raise DataError("a validation split was requested but data.valid_fraction is 0: set it, e.g. 0.05")
    if records - held_out < 1:
        raise DataError(f"{indexed.prefix} holds {records} instruction record(s), too few for training"
                        f"{' after the validation split' if held_out else ''}: give more records")
    chosen = slice(0, records - held_out) if split == "train" else slice(records - held_out, None)
    starts, bounds, ends = starts[chosen], bounds[chosen], ends[chosen]
    prompt, response = bounds - starts, ends - bounds
    formatter = InstructionFormat(tokenizer, data.seq_length, data.instruction_truncation, data.instruction_format)
    extra = formatter.extra_tokens
    too_long = np.flatnonzero(response + extra > data.seq_length)
    if too_long.size:
        worst = int(too_long[np.argmax(response[too_long])])
        raise DataError(f"{indexed.prefix}: {too_long.size} instruction record(s) of split {split} have a response "
                        f"longer than data.seq_length - {extra} = {data.seq_length - extra} tokens (the longest, "
                        f"record {worst + chosen.indices(records)[0]}, has {int(response[worst])}); responses are "
                        f"never cut: raise data.seq_length or shorten those responses")
    truncated = int(np.count_nonzero(prompt + response + extra > data.seq_length))
    if truncated and data.instruction_truncation == "error":
        raise DataError(f"{indexed.prefix}: {truncated} instruction record(s) exceed data.seq_length="
                        f"{data.seq_length} and data.instruction_truncation is 'error': set it to left or right, "
                        f"or raise data.seq_length")
    if truncated:
        logger.info("data (%s): %d of %d instruction records truncated to data.seq_length=%d (prompt cut from the %s)",
                    split, truncated, len(starts), data.seq_length, data.instruction_truncation)
    return InstructionDataset(indexed, tokenizer, formatter, starts, bounds, ends, seed, split)
