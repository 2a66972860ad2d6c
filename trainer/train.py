"""glm-train: the one entry point of every mode.

    glm-train --config configs/glm-debug.yaml [--set section.key=value ...] [--print-model]

Run directly it is the single-device debug mode (CPU or one GPU, no launcher, no environment
variables). Under the deepspeed launcher (or glm-launch) it reads RANK / WORLD_SIZE / LOCAL_RANK.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Optional

from trainer.config import Config, add_config_arguments, load_config
from trainer.errors import OneLineParser, env_int, exits_on_error
from trainer.preflight import check_data, preflight


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog="glm-train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--print-model", action="store_true",
                        help="print the model's parameter count (counted and closed form) and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


def print_outcome(config: Config, result) -> None:
    from trainer.engine.demo import show_what_was_learned

    print(f"metrics:      {result.run_dir / 'metrics.jsonl'}")
    print(f"tensorboard:  tensorboard --logdir {result.run_dir / 'tb'}")
    print(f"checkpoint:   {result.checkpoint_dir / (result.checkpoint_dir / 'latest').read_text().strip()}")
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
    config = load_config(args.config, args.overrides)
    if args.print_model:
        from trainer.model.summary import parameter_summary

        config.validate()
        if config.model.vocab_size == 0:
            config = check_data(config)
        print(parameter_summary(config.model, tp=config.parallel.tp))
        return 0
    config = preflight(config, env_int("WORLD_SIZE", 1, least=1))
    from trainer.engine.loop import train  # deepspeed is imported only once the config is valid

    result = train(config)
    if result.topology.world_size > 1 and env_int("RANK", 0) != 0:
        return 0
    if result.stopped_by_signal:
        print_interrupted(args, result)
    else:
        print_outcome(config, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
