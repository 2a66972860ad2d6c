"""glm-train: the one entry point of every mode.

    glm-train --config configs/glm-debug.yaml [--set section.key=value ...] [--print-model]

Run directly it is the single-device debug mode (CPU or one GPU, no launcher, no environment
variables). Under the deepspeed launcher (or glm-launch) it reads RANK / WORLD_SIZE / LOCAL_RANK.
With --config it resolves and validates the config itself (trainer/tools/preflight.py); glm-launch has done that
once for every rank and starts each with --resolved-config instead.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Optional

from trainer.checkpoint.tags import latest_tag
from trainer.config import Config, add_config_arguments, load_config
from trainer.errors import ConfigError, OneLineParser, env_int, exits_on_error
from trainer.tools.preflight import check_data, check_device, preflight


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog="glm-train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, required=False)
    parser.add_argument("--resolved-config", metavar="FILE",
                        help="a config glm-launch resolved and validated for this start, read as it is (instead of "
                             "--config and --set)")
    parser.add_argument("--restarts", type=int, default=0,
                        help="how many times glm-launch --max-restarts restarted this run before this start (set by "
                             "glm-launch; metrics.jsonl's `restarts`)")
    parser.add_argument("--print-model", action="store_true",
                        help="print the model's parameter counts (total and active, with and without MTP; counted "
                             "and closed form) and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


def given_config(args: argparse.Namespace) -> Config:
    """The resolved config: --resolved-config as glm-launch wrote it (its structure and types checked on reading,
    nothing re-validated), or --config with --set resolved and validated here, once (with --print-model only the
    config itself, and the vocabulary when the model takes it from the tokenizer)."""
    if args.resolved_config is not None:
        if args.config is not None or args.overrides:
            raise ConfigError("--resolved-config is the whole config of this start: give no --config or --set with it")
        return load_config(args.resolved_config)
    if args.config is None:
        raise ConfigError("the following arguments are required: --config")
    config = load_config(args.config, args.overrides)
    if args.print_model:
        config.validate()
        return check_data(config) if config.model.vocab_size == 0 else config
    return preflight(config, env_int("WORLD_SIZE", 1, least=1))


def print_outcome(config: Config, result) -> None:
    from trainer.tools.demo import show_what_was_learned  # lazy like the engine below: glm-train imports no torch

    print(f"metrics:      {result.run_dir / 'metrics.jsonl'}")
    print(f"tensorboard:  tensorboard --logdir {result.run_dir / 'tb'}")
    print(f"checkpoint:   {result.checkpoint_dir / latest_tag(result.checkpoint_dir)}")
    if result.topology.world_size == 1:
        print(show_what_was_learned(result.checkpoint_dir, config, result.dataset, result.consumed_samples))


def print_interrupted(args: argparse.Namespace, result) -> None:
    """After SIGINT / SIGTERM: where the run stopped and the command that continues it (no end-of-run demo)."""
    tag = (result.checkpoint_dir / "latest").read_text().strip()
    again = shlex.join(["glm-train", "--config", args.config,
                        *[arg for item in args.overrides + ["train.resume=true"] for arg in ("--set", item)]])
    print(f"interrupted at step {tag.removeprefix('global_step')}: checkpoint {result.checkpoint_dir / tag}; "
          f"resume with: {again}", flush=True)


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    config = given_config(args)
    if args.print_model:
        from trainer.model.counts import count_summary
        from trainer.model.summary import parameter_summary  # torch only once the config is valid

        print(count_summary(config.model, tp=config.parallel.tp))
        print(parameter_summary(config.model, tp=config.parallel.tp))
        return 0
    check_device(config)
    from trainer.engine.loop import train  # deepspeed is imported only once the config is valid

    evaluations = None
    if config.train.eval_tasks:  # lm-evaluation-harness tasks beside the validation loss (an optional extra)
        from trainer.tools.harness.in_loop import InLoopHarness

        evaluations = InLoopHarness
    result = train(config, restarts=args.restarts, evaluations=evaluations)
    if result.topology.world_size > 1 and env_int("RANK", 0) != 0:
        return 0
    if result.stopped_by_signal:
        print_interrupted(args, result)
    else:
        print_outcome(config, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
