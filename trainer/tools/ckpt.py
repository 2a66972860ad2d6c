"""glm-ckpt: change a checkpoint's layout, export it to one file or to transformers, import THUDM/GLM releases
and transformers checkpoints.

    glm-ckpt convert SOURCE --to-tp T --to-pp P --out RUN/checkpoints [--config YAML --set k=v ...]
    glm-ckpt export  SOURCE --out DIR [--format glm|hf] [--max-shard-gb G] [--tokenizer tokenizer.json]
                     [--dtype fp32|bf16|fp16] [--config YAML ...]
    glm-ckpt import-thudm RELEASE --out DIR [--tokenizer tokenizer.json] [--config YAML ...]
    glm-ckpt import-hf DIR --out DIR [--tokenizer tokenizer.json] [--dtype fp32|bf16|fp16]

SOURCE is a run directory or its checkpoints/ (their latest), a global_stepN directory of any (tp, pp, dp),
an export directory, a THUDM/GLM release or a transformers glm / glm4_moe / chatglm directory. Each carries its model
config; a --config given must agree with it (for a release it supplies what the release does not say).
docs/CHECKPOINTS.md has examples.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from trainer.errors import CheckpointError, ConfigError, OneLineParser, exits_on_error
from trainer.paths import overlap, staged_directory, uncreatable_directory
from trainer.tools.source_args import add_source_arguments, given_model_config, tokenizer_path

# torch and the checkpoint code are imported by the commands that use them, so `glm-ckpt --help` and a refused
# argument answer at once.
DTYPES = ("bf16", "fp16", "fp32")


def torch_dtype(name: str):
    """The torch dtype of a --dtype choice."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def check_output(args: argparse.Namespace) -> None:
    """--out can be written, lies apart from the source, and (but for convert, which adds a tag directory to a
    checkpoints/ directory) holds nothing yet: no output overwrites or writes inside what it is made from."""
    problem = uncreatable_directory(args.out)
    if problem:
        raise CheckpointError(f"--out {args.out} cannot be written: {problem}; choose another directory")
    problem = overlap(args.source, args.out)
    if problem:
        raise CheckpointError(f"--out {args.out} {problem}: glm-ckpt never writes into or over its source; choose "
                              f"a directory outside it")
    if args.command != "convert" and args.out.is_dir() and any(args.out.iterdir()):
        raise CheckpointError(f"--out {args.out} already holds files: glm-ckpt writes a new directory and never "
                              f"replaces one; choose another or remove it")


def convert(args: argparse.Namespace) -> str:
    if args.to_tp < 1 or args.to_pp < 1:
        raise ConfigError(f"--to-tp and --to-pp must be >= 1, got {args.to_tp} and {args.to_pp}: give the layout "
                          f"of the run that will load the checkpoint")
    from trainer.checkpoint.convert import convert_checkpoint

    tag_dir = convert_checkpoint(args.source, given_model_config(args), args.to_tp, args.to_pp, args.out)
    return f"wrote {tag_dir} (tp={args.to_tp}, pp={args.to_pp})"


def export(args: argparse.Namespace) -> str:
    from trainer.checkpoint import hf
    from trainer.checkpoint.export import write_export
    from trainer.checkpoint.model_source import read_weights

    if args.max_shard_gb is not None and not args.max_shard_gb > 0:
        raise ConfigError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    max_shard_bytes = hf.DEFAULT_MAX_SHARD_BYTES if args.max_shard_gb is None else int(args.max_shard_gb * 2 ** 30)
    config, weights = read_weights(args.source, given_model_config(args))
    tokenizer = tokenizer_path(args)
    parameters = f"{sum(w.numel() for w in weights.values())} parameters, {args.dtype}"
    if args.format == "hf":
        with staged_directory(args.out) as staging:
            files = hf.write_hf(weights, config, staging, tokenizer, torch_dtype(args.dtype),
                                max_shard_bytes)
        return f"wrote {args.out} (transformers glm, {parameters}, {files} safetensors file(s))"
    with staged_directory(args.out) as staging:
        write_export(weights, config, staging, tokenizer, torch_dtype(args.dtype))
    return f"wrote {args.out} ({parameters})"


def import_thudm(args: argparse.Namespace) -> str:
    from trainer.checkpoint.export import write_export
    from trainer.checkpoint.thudm import is_release, read_release

    if not is_release(args.source):
        raise CheckpointError(f"{args.source} is not a THUDM/GLM release: it needs latest_checkpointed_iteration.txt "
                              f"and <iteration>/mp_rank_XX_model_states.pt")
    config, weights = read_release(args.source, given_model_config(args))
    with staged_directory(args.out) as staging:
        write_export(weights, config, staging, args.tokenizer, torch_dtype(args.dtype))
    return (f"wrote {args.out} ({config.num_layers} layers, h={config.hidden_size}, "
            f"{config.num_attention_heads} heads, vocab {config.vocab_size})")


def import_hf(args: argparse.Namespace) -> str:
    from trainer.checkpoint import hf
    from trainer.checkpoint.export import write_export

    if not hf.is_hf_directory(args.source):
        raise CheckpointError(f"{args.source} is not a transformers checkpoint of model type "
                              f"{' or '.join(hf.MODEL_TYPES)}: it needs a config.json naming one")
    config, weights = hf.read_hf(args.source)
    with staged_directory(args.out) as staging:
        write_export(weights, config, staging, tokenizer_path(args), torch_dtype(args.dtype))
    return (f"wrote {args.out} ({config.num_layers} layers, h={config.hidden_size}, {config.num_attention_heads} "
            f"heads, {config.num_kv_heads} key/value heads, vocab {config.vocab_size})")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog="glm-ckpt", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, run, help_text in (("convert", convert, "write a training checkpoint for another (tp, pp)"),
                                 ("export", export, "write one safetensors file + config.json + tokenizer.json"),
                                 ("import-thudm", import_thudm, "turn a THUDM/GLM release into an export"),
                                 ("import-hf", import_hf,
                                  "turn a transformers glm / glm4_moe / chatglm checkpoint into an export")):
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(run=run)
        add_source_arguments(sub, tokenizer=name != "convert", config=name != "import-hf")
        sub.add_argument("--out", type=Path, required=True, help="output directory")
        if name == "convert":
            sub.add_argument("--to-tp", type=int, required=True, help="tensor-parallel size of the output")
            sub.add_argument("--to-pp", type=int, required=True, help="pipeline-parallel size of the output")
        else:
            sub.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype of the export")
        if name == "export":
            sub.add_argument("--format", choices=("glm", "hf"), default="glm",
                             help="glm: this trainer's export; hf: a transformers glm or glm4_moe directory "
                                  "(GlmForCausalLM, Glm4MoeForCausalLM)")
            sub.add_argument("--max-shard-gb", type=float, default=None,
                             help="--format hf: largest safetensors file, in GiB (default 5, as transformers)")
    return parser.parse_args(argv)


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    check_output(args)
    print(args.run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
