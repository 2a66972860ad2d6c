"""glm-memory-check: the planner's memory estimate against the peak resident memory of a DeepSpeed ZeRO run.

    python -m launch.memory_check --config configs/glm-debug.yaml --world 2 --zero-stage 3 \
        [--steps 3] [--tp 2 [--sequence-parallel]] [--set model.hidden_size=1024 ...] [--set parallel.cp=2]

Spawns `world` CPU processes on gloo. Each builds the trainer's own engine for the config
(trainer/engine/build.py: DeepSpeed's plain engine at pp = 1, ZeRO-3 under zero.Init) at the asked ZeRO stage,
and trains `steps` optimizer steps on random tokens (with parallel.cp, each rank its chunks of every row:
trainer/parallel/context.py). On CPU the device is the host, so a rank's resident set is its
device memory: the process's baseline (measured after importing torch and DeepSpeed and joining the process
group, before the model exists) and its peak resident set over the training steps (Linux VmHWM, reset after
the engine is built, so the one-time full-model copies of the set-up are not counted) are printed beside
the estimate of a CPU rank by launch/memory.py (the model this checks, hence its place in launch/) (whose reserve, CPU_RUNTIME_RESERVE, is that baseline as measured
here). The ranks run with glibc's mmap threshold fixed (ALLOCATOR_ENV): every block above it is mapped on its
own and unmapped when freed, so the resident set follows the live tensors, which is what the estimate counts
(and what a GPU's caching allocator holds). With glibc's default adaptive threshold freed heap stays resident
on top: docs/LAUNCH.md lists the shapes and results of both.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.multiprocessing as mp

from launch.memory import Layout, Workload, stage_memory
from trainer.config import Config, add_config_arguments, load_config
from trainer.engine.rendezvous import free_port
from trainer.errors import ConfigError, OneLineParser, exits_on_error

ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""glibc reads it when a process starts: blocks above 128 KiB (its default starting threshold, which then adapts
upwards as mapped blocks are freed) are mapped on their own and returned to the kernel when freed."""


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Set VmHWM to the current resident set (Linux: 5 to /proc/PID/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _batch(config: Config, generator: torch.Generator,
           cp_group) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    from trainer.model.mask import segments_of_sep
    from trainer.parallel.context import split_row

    b, s = config.parallel.micro_batch_size, config.data.seq_length
    ids = torch.randint(0, config.model.vocab_size, (b, s), generator=generator)  # [b, s]
    positions = torch.arange(s).expand(b, s)
    segments = segments_of_sep(torch.full((b,), s // 2), s)  # [b, 2, s]
    inputs, target = (ids, positions, torch.zeros_like(positions), segments), (ids, torch.ones_like(ids))
    return tuple(split_row(t, cp_group) for t in inputs), tuple(split_row(t, cp_group) for t in target)


def _rank(rank: int, world: int, port: int, config: Config, steps: int, results: "mp.Queue") -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    # Lazy, here and in _batch: DeepSpeed chooses its accelerator when first imported, which must happen in the
    # rank after DS_ACCELERATOR is set, not when the spawned process imports this module.
    from trainer.engine.build import build_engine
    from trainer.engine.distributed import init_distributed
    from trainer.parallel.random import model_parallel_seed
    from trainer.parallel.topology import Topology

    init_distributed()
    topology = Topology.create(config.parallel.tp, 1, config.parallel.cp)
    model_parallel_seed(config.train.seed, topology)
    baseline = resident_bytes("VmRSS")
    steps_of = build_engine(config, topology, world).steps
    reset_peak()
    generator = torch.Generator().manual_seed(topology.dp_rank)  # the cp ranks of a row read the same row
    for _ in range(steps):
        steps_of.train_batch([_batch(config, generator, topology.cp_group)
                              for _ in range(config.grad_accum_steps(world))])
    results.put({"rank": rank, "baseline": baseline, "peak": resident_bytes("VmHWM")})


def measure(config: Config, world: int, steps: int) -> list[dict]:
    """Baseline and peak resident bytes of every rank of a `world`-process run."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank, args=(rank, world, port, config, steps, results))
                 for rank in range(world)]
    saved = {key: os.environ.get(key) for key in ALLOCATOR_ENV}
    os.environ.update(ALLOCATOR_ENV)  # a spawned process starts with the parent's environment
    try:
        for process in processes:
            process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    rows: list[dict] = []
    while len(rows) < world:
        try:
            rows.append(results.get(timeout=5))
        except queue.Empty:
            failed = [process.exitcode for process in processes if process.exitcode]
            if failed:
                raise RuntimeError(f"a memory-check rank exited with status {failed[0]}") from None
    for process in processes:
        process.join()
    return sorted(rows, key=lambda row: row["rank"])


def estimate(config: Config, world: int) -> dict:
    """launch/memory.py's estimate of one CPU rank of this run (dp = world / (tp * cp))."""
    p, o = config.parallel, config.optim
    layout = Layout(p.tp, 1, world // (p.tp * p.cp), p.micro_batch_size, config.grad_accum_steps(world),
                    p.recompute_interval, o.zero_stage, o.offload_optimizer, o.offload_params, cp=p.cp,
                    sequence_parallel=p.sequence_parallel)
    return stage_memory(Workload.from_config(config, on_cpu=True), layout, 0, config.model.num_layers).to_dict()


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog="glm-memory-check", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--world", type=int, default=2, help="CPU processes (tp x dp x cp ranks; default 2)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps measured (default 3)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1; dp = world / tp)")
    parser.add_argument("--sequence-parallel", action="store_true", help="parallel.sequence_parallel (tp > 1)")
    return parser.parse_args(argv)


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides + [
        f"optim.zero_stage={args.zero_stage}", f"parallel.tp={args.tp}", "parallel.pp=1", "train.precision=fp32",
        f"parallel.sequence_parallel={str(args.sequence_parallel).lower()}"])
    if config.model.vocab_size <= 0 or args.world < 1 or args.steps < 1:
        raise ConfigError("the memory check needs model.vocab_size > 0 (set it with --set), --world >= 1 and "
                          "--steps >= 1")
    config.validate(world_size=args.world)
    rows = measure(config, args.world, args.steps)
    predicted = estimate(config, args.world)
    peak = max(row["peak"] for row in rows)
    print(json.dumps({"world": args.world, "tp": args.tp, "sequence_parallel": args.sequence_parallel,
                      "cp": config.parallel.cp, "zero_stage": args.zero_stage, "ranks": rows,
                      "measured_peak_bytes": peak, "estimate": predicted,
                      "error": round((predicted["total"] - peak) / peak, 4)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
