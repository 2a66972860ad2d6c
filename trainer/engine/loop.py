"""The training run: one code path for one CPU, one GPU or a 3D-parallel cluster.

Data order: optimizer step t consumes the global rows [c_t, c_t + B_t) (a row is one sample, or several
packed: trainer/data/packing.py). On data-parallel rank r, micro-batch k holds rows c_t + (k * dp + r) * b
+ [0, b), so the set of micro-batches of a step, and hence the step's loss (the mean over all its loss tokens:
trainer/engine/step_loss.py) and gradient, do not depend on the layout.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from trainer.checkpoint.run_record import run_record
from trainer.config import Config
from trainer.data.dataset import collate, micro_batch_indices, resolve_paths
from trainer.data.packing import OneSamplePerRow, build_sequences
from trainer.engine import checkpoint, deepspeed_compat, finetune
from trainer.engine.build import build_engine
from trainer.engine.distributed import init_distributed
from trainer.engine.faults import (NonFiniteSteps, PoisonedLoss, PreemptionHandler, TrainingFault, injected_nan_steps,
                                   is_finite)
from trainer.engine.flops import train_flops_per_token
from trainer.engine.metrics import MetricsWriter
from trainer.engine.run_dir import start_run_dir
from trainer.engine.schedule import consumed_samples_at, global_batch_at
from trainer.engine.step_loss import loss_replicas, step_normaliser
from trainer.errors import ConfigError
from trainer.model.mask import stack_segments
from trainer.parallel.context import split_row
from trainer.parallel.random import model_parallel_seed
from trainer.parallel.topology import Topology

EvaluationFactory = Callable[..., Callable[[], dict]]
"""(config, module, tokenizer, tp_group) -> a callable returning an evaluation step's extra metrics."""

log = logging.getLogger("glm.train")


@dataclass
class RunResult:
    losses: list[float]
    run_dir: Path
    checkpoint_dir: Path
    engine: object
    dataset: OneSamplePerRow
    topology: Topology
    consumed_samples: int
    stopped_by_signal: bool = False


def pipeline_format(batch: dict, normaliser: Optional[torch.Tensor] = None, cp_group=None) -> tuple:
    """Collated rows -> DeepSpeed's pipeline format ((input_ids, position_ids, block_position_ids, segments),
    (labels, loss_mask[, normaliser])); segments [b, 2, s] = (segment_start, segment_sep), the mask's input;
    normaliser: the step's loss normaliser (trainer/engine/step_loss.py), else the loss is the rows' token mean.
    With a cp_group every per-token tensor is cut to this rank's chunks of each row, s -> s / cp (the one place
    the batch is split: trainer/parallel/context.py)."""
    segments = stack_segments(batch["segment_start"], batch["segment_sep"])  # [b, 2, s]
    inputs = (batch["input_ids"], batch["position_ids"], batch["block_position_ids"], segments)
    target = (batch["labels"], batch["loss_mask"])
    inputs, target = (tuple(split_row(t, cp_group) for t in part) for part in (inputs, target))  # [.., s / cp]
    return inputs, target + (() if normaliser is None else (normaliser,))


def validation_rows(config: Config) -> range:
    """The rows of the validation split (build_sequences(..., split="valid")) every evaluation scores: the first
    train.eval_batches global batches, always the same ones. valid_loss / valid_ppl and the end-of-run demo's
    held-out perplexity are the mean NLL over all their loss tokens, so the two agree at the same step."""
    return range(config.train.eval_batches * config.parallel.global_batch_size)


def micro_batches(rows: OneSamplePerRow, consumed: int, grad_accum: int, topology: Topology,
                  micro_batch_size: int) -> list[tuple]:
    """The micro-batches of one optimizer step on this rank, in DeepSpeed's pipeline format, their loss
    normalised by the step's loss tokens (trainer/engine/step_loss.py)."""
    collated = [collate([rows[i] for i in micro_batch_indices(consumed, micro_step, topology.dp_rank, topology.dp,
                                                              micro_batch_size)])
                for micro_step in range(grad_accum)]
    normaliser = step_normaliser(collated, topology)
    return [pipeline_format(batch, normaliser, topology.cp_group) for batch in collated]


def _memory() -> dict:
    accelerator = get_accelerator()
    return {"allocated_bytes": float(accelerator.memory_allocated()),
            "peak_allocated_bytes": float(accelerator.max_memory_allocated())}


class Trainer:
    """Owns the engine, the data position and the outputs of one run. `config` is resolved and validated
    (trainer/tools/preflight.py); `restarts` is how many times glm-launch restarted the run before this start."""

    def __init__(self, config: Config, restarts: int = 0, evaluations: Optional[EvaluationFactory] = None):
        self.config, self.restarts = config, restarts
        nan_steps = injected_nan_steps()  # read before the process group starts: a bad value leaves nothing behind
        self.rank, self.world_size = init_distributed(config.train.collective_timeout_minutes)
        config.data_parallel_size(self.world_size)  # the one check left: the layout fits the ranks started
        self.topology = Topology.create(config.parallel.tp, config.parallel.pp, config.parallel.cp)
        model_parallel_seed(config.train.seed, self.topology)
        self.dataset = build_sequences(config.data, config.train.seed)
        if config.model.vocab_size < self.dataset.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size} cannot hold the tokenizer's "
                              f"{self.dataset.tokenizer.vocab_size} ids: train() takes the config preflight() returns")
        self.run_dir = Path(config.train.run_dir)
        self.owned = start_run_dir(config, resolve_paths(config.data)[1])  # run_dir locked until run() ends
        self.checkpoint_dir = self.run_dir / "checkpoints"
        built = build_engine(config, self.topology, self.world_size)
        self.engine, self.steps, self.own_clipping = built.engine, built.steps, built.clipping
        self.step = 0
        if config.train.resume:
            self.step, data_position = checkpoint.load_latest(self.engine, self.checkpoint_dir, self.topology,
                                                              config.model)
            self.dataset.restore(data_position)
            if self.rank == 0:
                print(f"resumed from step {self.step} of {config.train.steps} ({self.checkpoint_dir})", flush=True)
        finetune.start(self.engine, config, self.topology, resumed=config.train.resume)
        if nan_steps:
            module = self.engine.module
            module.loss_fn = PoisonedLoss(module.loss_fn, nan_steps, lambda: self.step + 1)
        self.unit = config.parallel.micro_batch_size * self.topology.dp
        self.consumed = consumed_samples_at(self.step, config)
        self.flops_per_token = train_flops_per_token(config.model, config.data.seq_length, config.parallel.tp)
        self.nonfinite = NonFiniteSteps(config.train.max_nonfinite_in_a_row)
        self.valid = build_sequences(config.data, config.train.seed, split="valid") if config.train.eval_interval else None
        # what evaluates beside the validation loss (train.eval_tasks: the tool layer's lm-evaluation-harness)
        self.evaluations = evaluations(config, self.engine.module, self.dataset.tokenizer, self.topology.tp_group) \
            if evaluations is not None else None

    def evaluate(self) -> dict:
        """Validation loss and perplexity over the rows validation_rows() names, pooled over their loss tokens,
        and the metrics of the in-loop evaluations (train.eval_tasks)."""
        config = self.config
        batch_size, grad_accum = config.parallel.global_batch_size, config.parallel.global_batch_size // self.unit
        nll = tokens = 0.0
        for index in range(config.train.eval_batches):
            batches = micro_batches(self.valid, index * batch_size, grad_accum, self.topology,
                                    config.parallel.micro_batch_size)
            # N = normaliser * GAS * dp * cp (trainer/engine/step_loss.py)
            loss_tokens = float(batches[0][1][2]) * grad_accum * loss_replicas(self.topology)
            nll += float(self.steps.eval_batch(batches, grad_accum)) * loss_tokens  # the batch's token mean * N
            tokens += loss_tokens
        loss = nll / tokens
        extra = self.evaluations() if self.evaluations else {}
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 80.0)), **extra}

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics record."""
        config, engine = self.config, self.engine
        batch_size = global_batch_at(self.step, config)
        if batch_size * self.topology.cp != engine.train_batch_size():  # DeepSpeed's count: engine/ds_config.py
            engine.set_train_batch_size(batch_size * self.topology.cp)
        skipped_before, lr = engine.skipped_steps, engine.get_lr()[0]
        start = time.perf_counter()
        batches = micro_batches(self.dataset, self.consumed, batch_size // self.unit, self.topology,
                                config.parallel.micro_batch_size)
        loss = self.steps.train_batch(batches).item()
        elapsed = time.perf_counter() - start
        self.step += 1
        self.consumed += batch_size
        grad_norm = self.own_clipping.norm if self.own_clipping else engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        skipped = engine.skipped_steps > skipped_before or not (is_finite(loss) and is_finite(grad_norm))
        self.nonfinite.record(skipped)
        # Real tokens of every row of the step (all ranks' rows, from the packing plan: the same at any layout).
        tokens = sum(self.dataset.real_tokens(row) for row in range(self.consumed - batch_size, self.consumed))
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "padding_fraction": 1.0 - tokens / (batch_size * config.data.seq_length),
                  "tokens_per_s": tokens / elapsed,
                  "tflops": tokens * self.flops_per_token / elapsed / self.world_size / 1e12,
                  "batch_size": batch_size, "consumed_samples": self.consumed,
                  "skipped": int(skipped), "skipped_total": self.nonfinite.total, "restarts": self.restarts}
        if config.train.precision == "fp16":
            record["loss_scale"] = deepspeed_compat.loss_scale(engine.optimizer)
        return record

    def _collective_fault(self, error: RuntimeError) -> TrainingFault:
        """A failed collective (a dead or hung peer) reported with this rank's place in the layout."""
        t = self.topology
        return TrainingFault(f"rank {self.rank} (pipeline stage {t.pp_rank}, tensor rank {t.tp_rank}, data rank "
                             f"{t.dp_rank}) stopped at step {self.step + 1}: {error}. If a peer rank died or hung, "
                             f"its own log names the cause; collectives time out after "
                             f"train.collective_timeout_minutes")

    def save(self) -> Path:
        return checkpoint.save(self.engine, self.checkpoint_dir, self.step, self.consumed,
                               keep=self.config.train.keep_checkpoints,
                               data_position=self.dataset.position(self.consumed), run_record=self._run_record())

    def _run_record(self) -> dict:
        t = self.topology
        return run_record(self.config.model, {"tp": t.tp, "pp": t.pp, "dp": t.dp}, self.owned.tokenizer_sha256)

    def _log(self, record: dict, progress) -> None:
        if not progress.disable:
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        elif self.rank == 0 and record["step"] % self.config.train.log_interval == 0:
            norm = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
            print(f"step {record['step']}/{self.config.train.steps} loss {record['loss']:.4f} "
                  f"lr {record['lr']:.3e} grad_norm {norm} tokens/s {record['tokens_per_s']:.0f}"
                  + (f" valid_loss {record['valid_loss']:.4f}" if "valid_loss" in record else "")
                  + (f" skipped {record['skipped_total']}" if record["skipped_total"] else ""), flush=True)

    def _iteration(self, preemption: PreemptionHandler, writer: MetricsWriter, progress) -> tuple[float, bool]:
        """One step with its evaluation, logging and checkpointing; returns (loss, stop requested)."""
        config = self.config
        record = self.train_step()
        every = config.train.eval_interval
        if every and (self.step % every == 0 or self.step == config.train.steps):
            record.update(self.evaluate())
        writer.write(record, _memory())
        progress.update(1)
        self._log(record, progress)
        if self.nonfinite.exceeded:
            self.save()
            raise TrainingFault(
                f"{self.nonfinite.in_a_row} steps in a row had a non-finite loss or gradient norm "
                f"(limit train.max_nonfinite_in_a_row={self.nonfinite.limit}); the last good state is "
                f"saved in {self.checkpoint_dir}: lower optim.lr or check the data, then resume")
        stop = preemption.should_stop(self.engine.device)
        interval = config.train.save_interval
        if stop or (interval and self.step % interval == 0) or self.step == config.train.steps:
            self.save()
        return record["loss"], stop

    def run(self) -> RunResult:
        writer = MetricsWriter(self.run_dir, enabled=self.rank == 0, resume_step=self.step)
        # A bar for one process on a terminal; log lines otherwise (a file would hold every \r redraw).
        progress = tqdm(total=self.config.train.steps, initial=self.step, desc="train", unit="step",
                        disable=self.world_size != 1 or not sys.stderr.isatty())
        losses: list[float] = []
        stopped = False
        with PreemptionHandler() as preemption:
            while self.step < self.config.train.steps and not stopped:
                try:
                    loss, stopped = self._iteration(preemption, writer, progress)
                except RuntimeError as error:
                    raise self._collective_fault(error) from error
                losses.append(loss)
        progress.close()
        writer.close()
        self.owned.release()
        return RunResult(losses, self.run_dir, self.checkpoint_dir, self.engine, self.dataset, self.topology,
                         self.consumed, stopped)


def train(config: Config, restarts: int = 0, evaluations: Optional[EvaluationFactory] = None) -> RunResult:
    """Train up to config.train.steps optimizer steps in total (resuming if asked); `config` as preflight()
    returns it. `evaluations(config, module, tokenizer, tp_group)`, when given, is called once the engine is built
    and returns what each evaluation step adds to the validation loss's metrics (glm-train passes the
    lm-evaluation-harness of train.eval_tasks: the engine imports no tool)."""
    return Trainer(config, restarts, evaluations).run()
