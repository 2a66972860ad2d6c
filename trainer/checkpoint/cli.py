"""glm-ckpt: change a checkpoint's layout, export it to one file, import THUDM/GLM releases.

    glm-ckpt convert SOURCE --to-tp T --to-pp P --out RUN/checkpoints [--config YAML --set k=v ...]
    glm-ckpt export  SOURCE --out DIR [--tokenizer tokenizer.json] [--dtype fp32|bf16|fp16] [--config YAML ...]
    glm-ckpt import-thudm RELEASE --out DIR [--tokenizer tokenizer.json] [--config YAML ...]

SOURCE is a run directory or its checkpoints/ (their latest), a global_stepN directory of any (tp, pp, dp),
an export directory or a THUDM/GLM release. Each carries its model config; a --config given must agree
with it (for a release it supplies what the release does not say). docs/CHECKPOINTS.md has examples.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from trainer.checkpoint.convert import convert_checkpoint
from trainer.checkpoint.export import write_export
from trainer.checkpoint.model_source import read_weights
from trainer.checkpoint.thudm import is_release, read_release
from trainer.errors import CheckpointError, OneLineParser, exits_on_error
from trainer.paths import uncreatable_directory
from trainer.source_args import add_source_arguments, given_model_config, tokenizer_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert(args: argparse.Namespace) -> str:
    tag_dir = convert_checkpoint(args.source, given_model_config(args), args.to_tp, args.to_pp, args.out)
    return f"wrote {tag_dir} (tp={args.to_tp}, pp={args.to_pp})"


def export(args: argparse.Namespace) -> str:
    config, weights = read_weights(args.source, given_model_config(args))
    write_export(weights, config, args.out, tokenizer_path(args), DTYPES[args.dtype])
    return f"wrote {args.out} ({sum(w.numel() for w in weights.values())} parameters, {args.dtype})"


def import_thudm(args: argparse.Namespace) -> str:
    if not is_release(args.source):
        raise CheckpointError(f"{args.source} is not a THUDM/GLM release: it needs latest_checkpointed_iteration.txt "
                              f"and <iteration>/mp_rank_XX_model_states.pt")
    config, weights = read_release(args.source, given_model_config(args))
    write_export(weights, config, args.out, args.tokenizer, DTYPES[args.dtype])
    return (f"wrote {args.out} ({config.num_layers} layers, h={config.hidden_size}, "
            f"{config.num_attention_heads} heads, vocab {config.vocab_size})")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog="glm-ckpt", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, run, help_text in (("convert", convert, "write a training checkpoint for another (tp, pp)"),
                                 ("export", export, "write one safetensors file + config.json + tokenizer.json"),
                                 ("import-thudm", import_thudm, "turn a THUDM/GLM release into an export")):
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(run=run)
        add_source_arguments(sub, tokenizer=name != "convert")
        sub.add_argument("--out", type=Path, required=True, help="output directory")
        if name == "convert":
            sub.add_argument("--to-tp", type=int, required=True, help="tensor-parallel size of the output")
            sub.add_argument("--to-pp", type=int, required=True, help="pipeline-parallel size of the output")
        else:
            sub.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype of the export")
    return parser.parse_args(argv)


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    problem = uncreatable_directory(args.out)
    if problem:
        raise CheckpointError(f"--out {args.out} cannot be written: {problem}; choose another directory")
    print(args.run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
