"""Pipeline efficiency: the same step on one stage and on p = 2 stages, in spawned processes.

With m micro-batches on p balanced stages, 1F1B keeps a stage busy m of m + p - 1 slots, so the ideal
step time is T_p = T_1 / p * (m + p - 1) / m, where T_1 is the whole model on one stage. The bench
reports the measured efficiency T_1 / (p T_p) next to the ideal m / (m + p - 1); stage imbalance (the
embedding on the first stage, the output layer and loss on the last) and communication make up the gap.
Both runs give each process the same threads (CPU) or one device each (GPU), so T_1 is one stage's speed.
"""
from __future__ import annotations

import dataclasses
import os
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp
from deepspeed.accelerator import get_accelerator

from trainer.bench.batches import synthetic_step
from trainer.bench.timing import Spread, timed
from trainer.config import Config
from trainer.engine.rendezvous import free_port


def _stage_worker(rank: int, world_size: int, port: int, config: Config, steps: int, warmup: int, threads: int,
                  results: Any) -> None:
    """One rank of a pp = world_size run; rank 0 sends its step times (or any rank its traceback)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        from trainer.engine.distributed import init_distributed, local_device
        from trainer.engine.build import build_engine
        from trainer.parallel.comm import barrier, world_group
        from trainer.parallel.random import model_parallel_seed
        from trainer.parallel.topology import Topology

        init_distributed(config.train.collective_timeout_minutes)
        topology = Topology.create(1, world_size)
        model_parallel_seed(config.train.seed, topology)
        grad_accum = config.grad_accum_steps(world_size)
        batches = synthetic_step(grad_accum, config.parallel.micro_batch_size, config.data.seq_length,
                                 config.model.vocab_size, topology, local_device(),
                                 mtp=config.model.mtp_layers > 0)
        steps_of = build_engine(config, topology, world_size).steps  # the plain engine at one stage
        for _ in range(warmup):
            steps_of.train_batch(batches)
        seconds = []
        for _ in range(steps):
            barrier(world_group())
            seconds.append(timed(lambda: steps_of.train_batch(batches)))
        if rank == 0:
            results.put(("ok", seconds))
    except BaseException:  # the parent reports it; a silent child would leave it waiting
        results.put(("error", f"rank {rank}: {traceback.format_exc()}"))
        raise


def _run_stages(config: Config, world_size: int, steps: int, warmup: int, threads: int) -> list[float]:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_stage_worker, args=(r, world_size, port, config, steps, warmup, threads, results))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    status, payload = results.get()
    for proc in procs:
        proc.join(timeout=60 if status == "ok" else 5)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"the pipeline benchmark failed on {payload}")
    return payload


def pipeline_config(config: Config, stages: int, micro_batches: int) -> Config:
    """The bench config with pp = stages and a global batch of `micro_batches` micro-batches (dp = 1)."""
    parallel = dataclasses.replace(config.parallel, tp=1, pp=stages,
                                   global_batch_size=micro_batches * config.parallel.micro_batch_size)
    return dataclasses.replace(config, parallel=parallel)


def pipeline_efficiency(config: Config, micro_batches: int, steps: int, warmup: int,
                        stages: int = 2) -> dict:
    """T_1 and T_p for the bench config -> measured and ideal efficiency, or why it was skipped."""
    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    if not on_cpu and accelerator.device_count() < stages:
        return {"skipped": f"pp={stages} needs {stages} devices, found {accelerator.device_count()}"}
    threads = max(1, torch.get_num_threads() // stages) if on_cpu else 1
    single = Spread.of(_run_stages(pipeline_config(config, 1, micro_batches), 1, steps, warmup, threads))
    staged = Spread.of(_run_stages(pipeline_config(config, stages, micro_batches), stages, steps, warmup, threads))
    return {"stages": stages, "micro_batches": micro_batches, "threads_per_process": threads if on_cpu else None,
            "single_stage_step_s": single.as_dict(), "pipeline_step_s": staged.as_dict(),
            "efficiency": single.median / (stages * staged.median),
            "ideal_efficiency": micro_batches / (micro_batches + stages - 1)}



