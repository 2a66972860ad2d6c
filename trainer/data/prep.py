"""glm-prep: text files / JSON lines -> PREFIX.bin + PREFIX.idx + PREFIX.tokenizer.json, and a look at the
blank-infilling samples they make and the packed rows training reads. Usage and every flag: docs/DATA.md."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from trainer.data.blank_infilling import BLANK_MODES, sample_rng
from trainer.data.config import DataConfig
from trainer.data.indexed import data_paths
from trainer.data.corpus import check_inputs, embedded_corpus, embedded_paragraphs_corpus, prepare, read_documents
from trainer.data.instruction import (MARKER_SUFFIX, as_documents, is_instruction_prefix, marker_path,
                                      read_instructions, write_marker)
from trainer.data.packing import ARRAY_KEYS, OneSamplePerRow, build_sequences
from trainer.data.tokenizer import GLMTokenizer, load_tokenizer, train_tokenizer
from trainer.errors import DataError, OneLineParser, exits_on_error
from trainer.paths import uncreatable_directory

DEFAULT_VOCAB_SIZE = 8192
PARALLEL_FROM = 64 << 20
"""Input bytes from which worker processes pay for their start-up (about a second each on 2 cores)."""
ROW_TEXT_WIDTH = 100
"""describe_row() shortens each decoded Part A / Part B text to this many characters."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog="glm-prep", description="text files / JSON lines -> PREFIX.bin + "
                           "PREFIX.idx + PREFIX.tokenizer.json; --samples shows blank-infilling samples "
                           "and packed rows (docs/DATA.md)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE",
                        help="text files (one document each) or JSON lines (.jsonl/.ndjson/.json, field `text`)")
    source.add_argument("--embedded", action="store_true",
                        help="prepare (or reuse) the embedded pydoc corpus in the cache directory")
    source.add_argument("--embedded-paragraphs", action="store_true",
                        help="prepare (or reuse) the embedded corpus cut into short documents (its paragraphs), "
                             "for packing measurements")
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
                        help="print K decoded blank-infilling samples, cycling [MASK], [sMASK], [gMASK], then the "
                             "first K packed rows of the training stream")
    parser.add_argument("--seq-length", type=int, default=DataConfig.seq_length, metavar="S",
                        help="data.seq_length (row length) for --samples")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the samples shown by --samples")
    args = parser.parse_args(argv)
    if args.input and not args.output_prefix:
        parser.error("--input needs --output-prefix")
    if (args.embedded or args.embedded_paragraphs) and (args.output_prefix or args.tokenizer or args.vocab_size):
        flag = "--embedded" if args.embedded else "--embedded-paragraphs"
        parser.error(f"{flag} takes neither --output-prefix, --tokenizer nor --vocab-size")
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


def output_paths(prefix: str) -> list[Path]:
    """The files glm-prep writes for a prefix (the instruction marker too: it is written or removed)."""
    return [*data_paths(prefix), Path(f"{prefix}.tokenizer.json"), marker_path(prefix)]


def prepare_inputs(args: argparse.Namespace) -> str:
    """Tokenize the --input files; returns the output prefix."""
    check_inputs(args.input)
    if args.output_prefix.endswith(os.sep) or Path(args.output_prefix).is_dir():
        raise DataError(f"--output-prefix {args.output_prefix} names a directory, not a file prefix: give a prefix "
                        f"such as {Path(args.output_prefix) / 'corpus'} (it writes PREFIX.bin, .idx, .tokenizer.json)")
    problem = uncreatable_directory(Path(args.output_prefix).parent)
    if problem:
        raise DataError(f"--output-prefix {args.output_prefix} cannot be written: {problem}; choose another prefix")
    in_the_way = [path for path in output_paths(args.output_prefix) if path.is_dir()]
    if in_the_way:  # the outputs are renamed into place together at the end: nothing may stop the last rename
        raise DataError(f"--output-prefix {args.output_prefix} cannot be written: {in_the_way[0]} is a directory; "
                        f"choose another prefix")
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer, add_special_tokens=args.add_special_tokens)
    else:
        vocab_size = DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size  # 0 is refused, not the default
        tokenizer = train_tokenizer(documents_of(args.input, args.instructions), vocab_size)
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


def clip(text: str, width: Optional[int]) -> str:
    """`text`, or when it is longer than `width` characters its start and end around an ellipsis (the end
    keeps a [gMASK] at the end of Part A in view)."""
    if width is None or len(text) <= width:
        return text
    head = (width - 1) * 2 // 3
    return text[:head] + "\u2026" + text[len(text) - (width - 1 - head):]


def describe(sample: dict, tokenizer: GLMTokenizer, width: Optional[int] = None) -> list[str]:
    """Part A as text (mask tokens written out) and each Part B span with the position of its blank; each
    text clipped to `width` characters (None: whole)."""
    sep, total = sample["sep"], sample["sep"] + int(sample["loss_mask"].sum())
    lines = [f"  Part A ({sep} tokens): {clip(tokenizer.decode(sample['input_ids'][:sep]), width)!r}"]
    starts = sep + np.flatnonzero(sample["block_position_ids"][sep:total] == 1)  # the sop of each span
    for start, end in zip(starts, [*starts[1:], total]):
        position = sample["position_ids"][start]
        blank = tokenizer.decode([sample["input_ids"][position]])
        span = clip(tokenizer.decode(sample["input_ids"][start + 1:end]), width)
        lines.append(f"  Part B, {blank} at {position}: {span!r}")
    return lines


def mode_of(part_a: np.ndarray, tokenizer: GLMTokenizer) -> str:
    """The mask token a sample's Part A holds: [gMASK] (instruction samples too), [sMASK] or [MASK]."""
    for token in (tokenizer.gmask_id, tokenizer.smask_id, tokenizer.mask_id):
        if token in part_a:
            return tokenizer.decode([token])
    return "no blank"


def describe_row(rows: OneSamplePerRow, k: int, text: bool = True) -> list[str]:
    """Row k: a header (samples, real slots, padding), then per sample its first slot, global index, length,
    sep and mode, followed (when `text`) by its Part A and Part B spans, clipped to ROW_TEXT_WIDTH."""
    row, members, tokenizer = rows[k], rows.members(k), rows.tokenizer
    seq_length, tokens = len(row["input_ids"]), int(row["tokens"])
    lines = [f"row {k}: {len(members)} sample(s), {tokens} of {seq_length} slots real, {seq_length - tokens} padding"]
    for index, start, end in zip(members, row["starts"], [*row["starts"][1:], tokens]):
        sample = {key: row[key][start:end] for key in ARRAY_KEYS}  # positions restart at 0 in each sample
        sample["sep"] = int(row["segment_sep"][start]) - start
        lines.append(f"  slot {start}: sample {index}, {end - start} tokens, sep {sample['sep']}, "
                     f"{mode_of(sample['input_ids'][:sample['sep']], tokenizer)}")
        if text:
            lines.extend("  " + line for line in describe(sample, tokenizer, ROW_TEXT_WIDTH))
    return lines


def samples_config(prefix: str, args: argparse.Namespace) -> DataConfig:
    """The data config --samples reads with (every blank-infilling mode equally likely), checked."""
    data = DataConfig(path=prefix, seq_length=args.seq_length, modes={mode: 1.0 for mode in BLANK_MODES})
    data.validate()
    return data


def show_samples(prefix: str, args: argparse.Namespace) -> None:
    """K samples (one per mode in turn, or instruction samples), then the first K rows training would read
    with every mode equally likely."""
    data = samples_config(prefix, args)
    rows, instructions = build_sequences(data, args.seed), is_instruction_prefix(prefix)
    dataset = rows.samples
    for k in range(args.samples):
        if instructions:
            sample, mode = dataset[k], "instruction"
        else:
            mode = BLANK_MODES[k % len(BLANK_MODES)]
            sample = dataset.infilling(dataset.sequence(k), sample_rng(args.seed, k), mode=mode)
        print(f"sample {k} ({mode}, sep={sample['sep']}, seq_length={data.seq_length}):")
        print("\n".join(describe(sample, dataset.tokenizer)))
    print(f"packed rows of the training stream (seq_length={data.seq_length}"
          f"{'' if instructions else ', modes equally likely'}):")
    for k in range(args.samples):
        print("\n".join(describe_row(rows, k)))


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.samples:
        samples_config("", args)  # a bad --seq-length is refused before anything is written
    if args.embedded:
        prefix = str(embedded_corpus())
        print(f"glm-prep: embedded corpus at {prefix}.bin/.idx/.tokenizer.json")
    elif args.embedded_paragraphs:
        prefix = str(embedded_paragraphs_corpus())
        print(f"glm-prep: embedded paragraphs corpus (short documents) at {prefix}.bin/.idx/.tokenizer.json")
    else:
        prefix = prepare_inputs(args)
    if args.samples:
        show_samples(prefix, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
