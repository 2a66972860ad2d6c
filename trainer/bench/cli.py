"""glm-bench: train a few steps of a config and put the trainer's speed next to its peers.

    glm-bench --config configs/glm-debug.yaml [--steps N] [--warmup N] [--json] [--peak-tflops X|DEVICE]
    glm-bench --device-check --out DIR [--smoke] [--config configs/glm-1.3b.yaml] [--peak-tflops DEVICE]

In one process (the single-device debug mode, tp = pp = 1), on the same synthetic batches: the DeepSpeed
engine, the same GLM in a bare PyTorch loop, and HF GPT-2 of the same shape take turns, one optimizer
step each per round. With a corpus (--set data.path=PREFIX) the engine then takes turns on the first
optimizer step of real rows, packed and unpacked, and reports their real-token throughput. Then pp = 2 runs
in two spawned processes (CPU: gloo; GPU: needs two devices). A mixture-of-experts config (model.moe_num_experts
> 0) also takes turns with its dense counterpart, the same model with a dense MLP of the same active parameters
on the same engine path (trainer/bench/dense_counterpart.py): tokens/s of both, their ratio, MFU over active
parameters.
--device-check runs the prepared accelerator check of trainer/bench/device_check.py instead (--smoke: the same
code on the CPU at configs/glm-debug.yaml's shape).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import platform
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from trainer.config import Config, add_config_arguments, load_config
from trainer.errors import ConfigError, GLMError, OneLineParser, env_int, exits_on_error
from trainer.paths import uncreatable_directory
from trainer.tools.preflight import check_data

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEVICE_CHECK_CONFIGS = {False: CONFIGS / "glm-1.3b.yaml", True: CONFIGS / "glm-debug.yaml"}
"""--device-check's default config, by --smoke."""

MEMORY_NOTE = {"cpu": "process resident set, sampled after each warm-up step",
               "gpu": "accelerator peak allocated during the engine's warm-up"}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog="glm-bench", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, required=False,
                         config_help="YAML run configuration (configs/*.yaml); --device-check: default "
                                     "configs/glm-1.3b.yaml, with --smoke configs/glm-debug.yaml")
    parser.add_argument("--steps", type=int, default=30,
                        help="timed rounds per comparison (engine and one contender, one optimizer step each; default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--peak-tflops", default=None, metavar="X|DEVICE",
                        help="peak TFLOP/s for MFU: a number or h100-sxm, h100-pcie, h200, a100")
    parser.add_argument("--pipeline-micro-batches", type=int, default=4, metavar="M",
                        help="micro-batches per step of the pp=2 comparison (default 4)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare PyTorch loop")
    parser.add_argument("--no-hf", action="store_true", help="skip HF GPT-2")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the pp=2 comparison")
    parser.add_argument("--no-dense", action="store_true",
                        help="a mixture-of-experts config: skip its dense counterpart of the same active parameters")
    parser.add_argument("--device-check", action="store_true",
                        help="the prepared accelerator check (GEMM ceiling, FlexAttention vs SDPA, engine at two "
                             "micro-batch sizes, profile split) into --out DIR")
    parser.add_argument("--out", default=None, metavar="DIR", help="--device-check: where device_check.json goes")
    parser.add_argument("--smoke", action="store_true",
                        help="--device-check on the CPU at configs/glm-debug.yaml's shape (tiny, fp32): the CI test")
    args = parser.parse_args(argv)
    if args.device_check:
        if args.out is None:
            parser.error("--device-check needs --out DIR")
        args.config = args.config or str(DEVICE_CHECK_CONFIGS[args.smoke])
    elif args.config is None:
        parser.error("the following arguments are required: --config")
    elif args.smoke or args.out:
        parser.error("--smoke and --out belong to --device-check")
    return args


def bench_config(args: argparse.Namespace) -> Config:
    """The config on one process (tp = pp = 1), the vocabulary resolved, checked."""
    config = load_config(args.config, args.overrides)
    laid_out = [f"parallel.{key}={value}" for key, value in (("tp", config.parallel.tp), ("pp", config.parallel.pp))
                if value != 1 and any(item.strip().startswith(f"parallel.{key}=") for item in args.overrides)]
    if laid_out:
        raise ConfigError(f"glm-bench runs one process (tp = pp = 1) and its own pp=2 comparison, so --set "
                          f"{' '.join(laid_out)} would not be measured: remove it (time a layout with glm-launch)")
    config.parallel = dataclasses.replace(config.parallel, tp=1, pp=1)
    if args.steps < 1 or args.warmup < 1 or args.pipeline_micro_batches < 1:
        raise ConfigError("--steps, --warmup and --pipeline-micro-batches must be >= 1")
    check_peak(args.peak_tflops, config.train.precision)
    if env_int("WORLD_SIZE", 1, least=1) > 1:
        raise ConfigError("run glm-bench directly, not under a launcher: it spawns its own pp=2 processes")
    config.validate(world_size=1)
    if config.data.path:  # the real batches read it: the files, the tokenizer and the vocabulary must fit
        config = check_data(config)
    elif config.model.vocab_size == 0:
        try:
            config = check_data(config)
        except GLMError as error:
            raise ConfigError(f"model.vocab_size is 0 and the tokenizer is not readable ({error}): "
                              f"pass --set model.vocab_size=N") from None
    config.model.validate(1)
    return config


def check_peak(peak: Optional[str], precision: str) -> None:
    """--peak-tflops, when given, is a device name or a finite number of TFLOP/s > 0 (it divides the MFU)."""
    from trainer.engine.flops import peak_tflops

    value = peak_tflops(peak, precision)
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--peak-tflops must be a finite number > 0 or a device name, got {peak}: give the "
                          f"accelerator's peak TFLOP/s")


def device_description() -> str:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return (f"CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                f"with {torch.get_num_threads()} threads")
    return f"{accelerator.device_name()} x{accelerator.device_count()}, torch {torch.__version__}"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr for the block (the libraries' and spawned ranks' prints included),
    so that stdout carries only the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if args.device_check:
        return device_check(args)
    config = bench_config(args)
    from trainer.bench.run import run_bench  # deepspeed is imported only once the config is valid

    with stdout_to_stderr():
        report = run_bench(config, args, device_description(), MEMORY_NOTE)
    from trainer.bench.report import to_json, to_text  # imports deepspeed too (engine/flops.py): lazy like run_bench

    print(to_json(report) if args.json else to_text(report))
    return 0


def device_check(args: argparse.Namespace) -> int:
    """--device-check: the config on one process; --smoke: fp32 at a tiny glm-debug shape (the CI test, run
    with DS_ACCELERATOR=cpu)."""
    problem = uncreatable_directory(Path(args.out))
    if problem:
        raise ConfigError(f"--out {args.out}: {problem}; pass a directory that can be created")
    overrides = list(args.overrides)
    if args.smoke:
        overrides = ["train.precision=fp32", "model.vocab_size=384", "model.num_layers=2", "model.hidden_size=32",
                     "data.seq_length=128", "model.max_sequence_length=128", *overrides]
    config = load_config(args.config, overrides)
    config.parallel = dataclasses.replace(config.parallel, tp=1, pp=1)
    check_peak(args.peak_tflops, config.train.precision)
    config.validate(world_size=1)
    config.model.validate(1)
    from trainer.bench.device_check import run_device_check, to_text  # deepspeed only once the config is valid

    with stdout_to_stderr():
        report = run_device_check(config, Path(args.out), args.smoke, args.peak_tflops,
                                  {"config": args.config, "overrides": overrides})
    print(to_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
