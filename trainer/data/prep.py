"""glm-prep: text files / JSON lines -> PREFIX.bin + PREFIX.idx + PREFIX.tokenizer.json, and a look at the
blank-infilling samples they make. Usage and every flag: docs/DATA.md."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from trainer.data.blank_infilling import MODES, sample_rng
from trainer.data.config import DataConfig
from trainer.data.corpus import check_inputs, embedded_corpus, prepare, read_documents
from trainer.data.dataset import build_dataset
from trainer.data.instruction import (MARKER_SUFFIX, as_documents, is_instruction_prefix, marker_path,
                                      read_instructions, write_marker)
from trainer.data.tokenizer import GLMTokenizer, load_tokenizer, train_tokenizer
from trainer.errors import exits_on_error

DEFAULT_VOCAB_SIZE = 8192
PARALLEL_FROM = 64 << 20
"""Input bytes from which worker processes pay for their start-up (about a second each on 2 cores)."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="glm-prep", description="text files / JSON lines -> PREFIX.bin + "
                                     "PREFIX.idx + PREFIX.tokenizer.json; --samples shows blank-infilling samples "
                                     "(docs/DATA.md)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE",
                        help="text files (one document each) or JSON lines (.jsonl/.ndjson/.json, field `text`)")
    source.add_argument("--embedded", action="store_true",
                        help="prepare (or reuse) the embedded pydoc corpus in the cache directory")
    parser.add_argument("--output-prefix", metavar="PREFIX",
                        help="write PREFIX.bin, PREFIX.idx, PREFIX.tokenizer.json")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.json instead of training one")
    vocab.add_argument("--vocab-size", type=int, metavar="N",
                       help=f"train a byte-level BPE of N ids on the input (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--instructions", action="store_true",
                        help="the inputs are JSON lines of {prompt, response[, history]}: write instruction records "
                             "(docs/FINETUNE.md)")
    parser.add_argument("--add-special-tokens", action="store_true",
                        help="with --tokenizer: append the GLM special tokens it lacks")
    parser.add_argument("--workers", type=int, metavar="N",
                        help=f"tokenizer processes (default: 1 below {PARALLEL_FROM >> 20} MiB of input, else one per CPU)")
    parser.add_argument("--samples", type=int, default=0, metavar="K",
                        help="print K decoded blank-infilling samples, cycling [MASK], [sMASK], [gMASK]")
    parser.add_argument("--seq-length", type=int, default=DataConfig.seq_length, metavar="S",
                        help="sample length for --samples")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the samples shown by --samples")
    args = parser.parse_args(argv)
    if args.input and not args.output_prefix:
        parser.error("--input needs --output-prefix")
    if args.embedded and (args.output_prefix or args.tokenizer or args.vocab_size):
        parser.error("--embedded takes neither --output-prefix, --tokenizer nor --vocab-size")
    if args.instructions and not args.input:
        parser.error("--instructions needs --input")
    if args.add_special_tokens and not args.tokenizer:
        parser.error("--add-special-tokens needs --tokenizer")
    if (args.workers is not None and args.workers < 1) or args.samples < 0:
        parser.error("--workers must be >= 1 and --samples >= 0")
    return args


def documents_of(paths: list[str], instructions: bool = False) -> Iterator[str]:
    """The documents of the inputs; instruction records as two documents each (prompt, response)."""
    for path in paths:
        yield from as_documents(read_instructions(path)) if instructions else read_documents(path)


def prepare_inputs(args: argparse.Namespace) -> str:
    """Tokenize the --input files; returns the output prefix."""
    check_inputs(args.input)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer, add_special_tokens=args.add_special_tokens)
    else:
        tokenizer = train_tokenizer(documents_of(args.input, args.instructions), args.vocab_size or DEFAULT_VOCAB_SIZE)
    total = sum(Path(p).stat().st_size for p in args.input)
    workers = args.workers or ((os.cpu_count() or 1) if total >= PARALLEL_FROM else 1)
    start = time.perf_counter()
    documents, tokens = prepare(documents_of(args.input, args.instructions), args.output_prefix, tokenizer, workers,
                                total_chars=total)
    if args.instructions:
        write_marker(args.output_prefix, documents // 2)
    else:
        marker_path(args.output_prefix).unlink(missing_ok=True)  # the prefix now holds text, not records
    seconds = time.perf_counter() - start
    kind = f"{documents // 2} instruction records" if args.instructions else f"{documents} documents"
    print(f"glm-prep: {kind}, {tokens} tokens ({tokens / seconds:,.0f} tokens/s with {workers} "
          f"worker(s)), vocabulary {tokenizer.vocab_size} -> {args.output_prefix}.bin/.idx/.tokenizer.json"
          + (f"/{MARKER_SUFFIX}" if args.instructions else ""))
    return args.output_prefix


def describe(sample: dict, tokenizer: GLMTokenizer) -> list[str]:
    """Part A as text (mask tokens written out) and each Part B span with the position of its blank."""
    sep, total = sample["sep"], sample["sep"] + int(sample["loss_mask"].sum())
    lines = [f"  Part A ({sep} tokens): {tokenizer.decode(sample['input_ids'][:sep])!r}"]
    starts = sep + np.flatnonzero(sample["block_position_ids"][sep:total] == 1)  # the sop of each span
    for start, end in zip(starts, [*starts[1:], total]):
        position = sample["position_ids"][start]
        blank = tokenizer.decode([sample["input_ids"][position]])
        lines.append(f"  Part B, {blank} at {position}: {tokenizer.decode(sample['input_ids'][start + 1:end])!r}")
    return lines


def show_samples(prefix: str, args: argparse.Namespace) -> None:
    data = DataConfig(path=prefix, seq_length=args.seq_length, modes={mode: 1.0 for mode in MODES})
    data.validate()
    dataset = build_dataset(data, args.seed)
    if is_instruction_prefix(prefix):
        for k in range(args.samples):
            sample = dataset[k]
            print(f"sample {k} (instruction, sep={sample['sep']}, seq_length={data.seq_length}):")
            print("\n".join(describe(sample, dataset.tokenizer)))
        return
    for k in range(args.samples):
        mode = MODES[k % len(MODES)]
        sample = dataset.infilling(dataset.sequence(k), sample_rng(args.seed, k), mode=mode)
        print(f"sample {k} ({mode}, sep={sample['sep']}, seq_length={data.seq_length}):")
        print("\n".join(describe(sample, dataset.tokenizer)))


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.embedded:
        prefix = str(embedded_corpus())
        print(f"glm-prep: embedded corpus at {prefix}.bin/.idx/.tokenizer.json")
    else:
        prefix = prepare_inputs(args)
    if args.samples:
        show_samples(prefix, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
