"""The training run: one code path for one CPU, one GPU or a 3D-parallel cluster.

Data order: optimizer step t consumes the global samples [c_t, c_t + B_t). On data-parallel rank r,
micro-batch k holds samples c_t + (k * dp + r) * b + [0, b), so the set of micro-batches of a step,
and hence the step's loss (their mean) and gradient, do not depend on the layout.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from trainer.config import Config
from trainer.data.dataset import GLMDataset, build_dataset, collate, micro_batch_indices
from trainer.engine import checkpoint
from trainer.engine.distributed import init_distributed
from trainer.engine.ds_config import build_ds_config
from trainer.engine.flops import train_flops_per_token
from trainer.engine.grad_norm import clip_grads_
from trainer.engine.metrics import MetricsWriter
from trainer.engine.optimizer import build_optimizer
from trainer.engine.pipeline import GLMPipeline
from trainer.engine.schedule import consumed_samples_at, global_batch_at, lr_lambda
from trainer.errors import ConfigError
from trainer.parallel.random import checkpoint as recompute_checkpoint
from trainer.parallel.random import model_parallel_seed
from trainer.parallel.topology import Topology

log = logging.getLogger("glm.train")


@dataclass
class RunResult:
    losses: list[float]
    run_dir: Path
    checkpoint_dir: Path
    engine: object
    dataset: GLMDataset
    topology: Topology


def micro_batches(dataset: GLMDataset, consumed: int, grad_accum: int, topology: Topology,
                  micro_batch_size: int) -> Iterator[tuple]:
    """The micro-batches of one optimizer step on this rank, in DeepSpeed's pipeline format
    ((input_ids, position_ids, block_position_ids, sep), (labels, loss_mask))."""
    for micro_step in range(grad_accum):
        indices = micro_batch_indices(consumed, micro_step, topology.dp_rank, topology.dp, micro_batch_size)
        batch = collate([dataset[i] for i in indices])
        yield ((batch["input_ids"], batch["position_ids"], batch["block_position_ids"], batch["sep"]),
               (batch["labels"], batch["loss_mask"]))


def resolve_vocab(config: Config, dataset: GLMDataset) -> None:
    """Take the vocabulary from the tokenizer, or check that the configured one can hold it."""
    vocab = dataset.tokenizer.vocab_size
    if config.model.vocab_size == 0:
        config.model.vocab_size = vocab
    elif config.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                          f"{vocab} tokens: set model.vocab_size to 0 (take it from the tokenizer) or >= {vocab}")


def _use_own_clipping(engine, topology: Topology, max_norm: float, device) -> dict:
    """fp32 without ZeRO: DeepSpeed's clip_fp32_gradients counts the tied embedding twice and drops
    replicated weights on later pipeline stages; clip with the layout-aware norm instead."""
    state = {"norm": None}
    params = [p for p in engine.module.parameters() if p.requires_grad]
    group = engine.mpu.get_model_parallel_group() if engine.mpu is not None else None

    def clip() -> None:
        state["norm"] = clip_grads_(params, max_norm, topology.tp_rank, group, device).item()

    engine.clip_fp32_gradients = clip
    if max_norm <= 0:  # DeepSpeed skips the clip call altogether; record the norm at the step instead
        original_step = engine._take_model_step

        def step_and_norm(*args, **kwargs):
            clip()
            return original_step(*args, **kwargs)

        engine._take_model_step = step_and_norm
    return state


def build_engine(config: Config, topology: Topology, world_size: int):
    module = GLMPipeline(config.model, topology, config.train.seed,
                         activation_checkpoint_interval=config.parallel.activation_checkpoint_interval,
                         activation_checkpoint_func=recompute_checkpoint)
    optimizer = build_optimizer(module, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_ds_config(config, world_size))
    return engine


def _memory() -> dict:
    accelerator = get_accelerator()
    return {"allocated_bytes": float(accelerator.memory_allocated()),
            "peak_allocated_bytes": float(accelerator.max_memory_allocated())}


def train(config: Config) -> RunResult:
    """Train config.train.steps optimizer steps (resuming if asked); returns the losses of this process."""
    rank, world_size = init_distributed()
    config.validate(world_size)
    topology = Topology.create(config.parallel.tp, config.parallel.pp)
    model_parallel_seed(config.train.seed, topology)
    dataset = build_dataset(config.data, config.train.seed)
    resolve_vocab(config, dataset)
    config.model.validate(config.parallel.tp)

    run_dir = Path(config.train.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    engine = build_engine(config, topology, world_size)
    own_clip = None
    if config.train.precision == "fp32" and config.optim.zero_stage == 0:
        own_clip = _use_own_clipping(engine, topology, config.optim.grad_clip, engine.device)

    start_step = 0
    if config.train.resume:
        start_step, _, _ = checkpoint.load_latest(engine, checkpoint_dir)
    unit = config.parallel.micro_batch_size * topology.dp
    consumed = consumed_samples_at(start_step, config, unit)
    writer = MetricsWriter(run_dir, enabled=rank == 0, resume_step=start_step)
    flops_per_token = train_flops_per_token(config.model, config.data.seq_length, config.parallel.tp)
    single = world_size == 1
    steps = range(start_step, config.train.steps)
    progress = tqdm(steps, desc="train", unit="step", disable=not single)
    losses: list[float] = []
    for step in progress:
        batch_size = global_batch_at(step, config, unit)
        if batch_size != engine.train_batch_size():
            engine.set_train_batch_size(batch_size)
        grad_accum = batch_size // unit
        start = time.perf_counter()
        loss = engine.train_batch(micro_batches(dataset, consumed, grad_accum, topology,
                                                config.parallel.micro_batch_size)).item()
        elapsed = time.perf_counter() - start
        consumed += batch_size
        losses.append(loss)
        record = {"step": step + 1, "loss": loss, "lr": engine.get_lr()[0],
                  "grad_norm": own_clip["norm"] if own_clip else _engine_grad_norm(engine),
                  "tokens_per_s": batch_size * config.data.seq_length / elapsed,
                  "tflops": batch_size * config.data.seq_length * flops_per_token / elapsed / world_size / 1e12,
                  "batch_size": batch_size, "consumed_samples": consumed}
        if config.train.precision == "fp16":
            record["loss_scale"] = float(engine.optimizer.cur_scale)
        writer.write(record, _memory())
        if single:
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
        elif rank == 0 and (step + 1) % config.train.log_interval == 0:
            print(f"step {step + 1}/{config.train.steps} loss {loss:.4f} lr {record['lr']:.3e} "
                  f"grad_norm {record['grad_norm']:.3f} tokens/s {record['tokens_per_s']:.0f}", flush=True)
        interval = config.train.save_interval
        if (interval and (step + 1) % interval == 0) or step + 1 == config.train.steps:
            checkpoint.save(engine, checkpoint_dir, step + 1, consumed)
    writer.close()
    return RunResult(losses, run_dir, checkpoint_dir, engine, dataset, topology)


def _engine_grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
