"""The model source every offline tool takes (glm-ckpt, glm-generate, glm-eval): SOURCE, `--tokenizer` and an
optional `--config` / `--set`. Every source carries its model config (trainer/checkpoint/model_source.py),
so `--config` is needed only for checkpoints saved before they recorded it; a given one must agree."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from trainer.config import add_config_arguments, load_config
from trainer.errors import ConfigError, env_int
from trainer.model.config import ModelConfig

# The model, checkpoint and data code (torch, DeepSpeed) are imported where they are used, so the tools' `--help`
# and refused arguments answer at once.

SOURCE_HELP = ("a run directory, its checkpoints/ or a global_stepN directory, an export, a THUDM/GLM release or a "
               "transformers glm / chatglm directory")
CONFIG_HELP = "a YAML config whose model must match the source's (needed only for checkpoints saved without run.json)"


def add_source_arguments(parser: argparse.ArgumentParser, tokenizer: bool = True, config: bool = True) -> None:
    parser.add_argument("source", type=Path, help=SOURCE_HELP)
    if tokenizer:
        parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the one an export or a "
                                                           "transformers directory ships, or the run's run_dir/tokenizer.json)")
    if config:
        add_config_arguments(parser, required=False, config_help=CONFIG_HELP)


def given_model_config(args: argparse.Namespace) -> Optional[ModelConfig]:
    """The model section of --config / --set, its vocabulary resolved against its data's tokenizer when 0;
    None without --config."""
    if getattr(args, "config", None) is None:
        return None
    from trainer.tools.preflight import check_data

    config = load_config(args.config, args.overrides)
    if config.model.vocab_size == 0:
        config = check_data(config)
    return config.model


def tokenizer_path(args: argparse.Namespace) -> Optional[Path]:
    """--tokenizer, else the source's own (an export's, a training checkpoint's run's), else the data
    tokenizer of --config; None when there is none."""
    from trainer.checkpoint.model_source import source_tokenizer
    from trainer.data.dataset import resolve_paths

    if getattr(args, "tokenizer", None) is not None:
        return args.tokenizer
    own = source_tokenizer(args.source) if args.source.is_dir() else None
    if own is None and getattr(args, "config", None):
        return resolve_paths(load_config(args.config, args.overrides).data)[1]
    return own


def load_source_model(args: argparse.Namespace):
    """(model shard, ModelConfig, tokenizer, tp_group) from the source arguments of glm-generate / glm-eval.
    Under a launcher (WORLD_SIZE > 1) every rank is one tensor-parallel rank."""
    from trainer.checkpoint.model_source import build_model, read_weights
    from trainer.data.tokenizer import load_tokenizer
    from trainer.engine.distributed import init_distributed
    from trainer.parallel.topology import Topology

    if not args.source.exists():
        raise ConfigError(f"{args.source} does not exist: give a run directory, a checkpoint, an export or a "
                          f"THUDM release")
    tokenizer = tokenizer_path(args)
    if tokenizer is None:
        raise ConfigError(f"no tokenizer: {args.source} ships no tokenizer.json; pass --tokenizer PATH")
    config, weights = read_weights(args.source, given_model_config(args))
    tp_group = None
    if env_int("WORLD_SIZE", 1, least=1) > 1:
        _, world_size = init_distributed()
        config.validate(world_size)
        tp_group = Topology.create(world_size, 1).tp_group
    loaded = load_tokenizer(tokenizer)
    if loaded.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer {tokenizer} has {loaded.vocab_size} ids but the model {args.source} embeds "
                          f"{config.vocab_size}: its ids above {config.vocab_size - 1} have no embedding; use the "
                          f"tokenizer the model was trained with")
    return build_model(config, weights, tp_group), config, loaded, tp_group
