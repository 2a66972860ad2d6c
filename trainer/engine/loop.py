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
from concurrent.futures import Future, ThreadPoolExecutor
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
from trainer.engine.moe_balance import ExpertBalancing
from trainer.engine.run_dir import start_run_dir
from trainer.engine.schedule import consumed_samples_at, global_batch_at
from trainer.engine.step_loss import StepCounts, loss_replicas, step_counts
from trainer.engine.step_values import StepValues
from trainer.errors import ConfigError
from trainer.model.mask import stack_segments
from trainer.model.mtp import mtp_batch
from trainer.parallel.comm import mean_over_, sum_over_
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


def pipeline_format(batch: dict, normaliser: Optional[torch.Tensor] = None,
                    mtp_normaliser: Optional[torch.Tensor] = None, cp_group=None) -> tuple:
    """Collated rows -> DeepSpeed's pipeline format ((input_ids, position_ids, block_position_ids, segments[,
    next_input_ids]), (labels, loss_mask[, normaliser, loss_positions[, MTP normaliser, MTP labels, MTP loss
    mask]])); segments [b, 2, s] = (segment_start, segment_sep), the mask's input; normaliser: the step's loss
    normaliser (trainer/engine/step_loss.py), with which the loss also takes the loss positions (GLMLoss);
    mtp_normaliser: the MTP layer's, with which the batch carries the MTP layer's fields (trainer/model/mtp.py
    mtp_batch: shifted here, on the whole rows); without them each loss is the rows' token mean. With a cp_group
    every per-token tensor is cut to this rank's chunks of each row, s -> s / cp (the one place the batch is split:
    trainer/parallel/context.py), after the MTP shift, so a chunk's last slot keeps its true t+1 and t+2; the loss
    positions, which collate counted on the whole rows, are recounted on the chunks (the flat indices of their loss
    tokens)."""
    segments = stack_segments(batch["segment_start"], batch["segment_sep"])  # [b, 2, s]
    inputs = (batch["input_ids"], batch["position_ids"], batch["block_position_ids"], segments)
    target = (batch["labels"], batch["loss_mask"])
    mtp_target = ()
    if mtp_normaliser is not None:
        mtp = mtp_batch(batch["input_ids"], batch["labels"], batch["loss_mask"], batch["segment_start"])
        inputs, mtp_target = inputs + (mtp.next_input_ids,), (mtp.labels, mtp.loss_mask)
    inputs, target, mtp_target = (tuple(split_row(t, cp_group) for t in part)
                                  for part in (inputs, target, mtp_target))  # [.., s] -> [.., s / cp]
    if normaliser is not None:
        positions = batch["loss_positions"] if cp_group is None else target[1].reshape(-1).nonzero().squeeze(1)
        target += (normaliser, positions)  # positions [n]: flat indices into [b, s / cp]
        if mtp_target:
            target += (mtp_normaliser, *mtp_target)
    return inputs, target


def validation_rows(config: Config) -> range:
    """The rows of the validation split (build_sequences(..., split="valid")) every evaluation scores: the first
    train.eval_batches global batches, always the same ones. valid_loss / valid_ppl and the end-of-run demo's
    held-out perplexity are the mean NLL over all their loss tokens, so the two agree at the same step."""
    return range(config.train.eval_batches * config.parallel.global_batch_size)


def collated_micro_batches(rows: OneSamplePerRow, consumed: int, grad_accum: int, topology: Topology,
                           micro_batch_size: int) -> list[dict]:
    """The collated micro-batches of one optimizer step on this rank, host work only (reading and packing rows,
    collate), in pinned host memory where the accelerator has it (so their copies to the device do not wait)."""
    pin = get_accelerator().pin_memory
    return [{key: pin(value) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
            for batch in (collate([rows[i] for i in micro_batch_indices(consumed, micro_step, topology.dp_rank,
                                                                         topology.dp, micro_batch_size)])
                          for micro_step in range(grad_accum))]


def micro_batches(collated: list[dict], topology: Topology, mtp: bool = False) -> tuple[list[tuple], StepCounts]:
    """A step's collated micro-batches -> the same in DeepSpeed's pipeline format, their loss normalised by the
    step's loss tokens (with `mtp` the MTP layer's by its own), and the step's counts
    (trainer/engine/step_loss.py: a collective over the dp ranks)."""
    counts = step_counts(collated, topology, get_accelerator().current_device_name(), mtp)
    return [pipeline_format(batch, counts.normaliser, counts.mtp_normaliser, topology.cp_group)
            for batch in collated], counts


class NextStepRows:
    """Prepares the next optimizer step's collated micro-batches (collated_micro_batches) in a background thread
    while the current step runs on the device, so the packing windows are planned and the rows read and
    collated off the step's critical path. One step ahead at most; the rows dataset is touched by that thread
    only while a step is prepared, so `idle()` waits for it before anyone else reads the dataset."""

    def __init__(self, rows: OneSamplePerRow, topology: Topology, micro_batch_size: int):
        self.rows, self.topology, self.micro_batch_size = rows, topology, micro_batch_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm-rows")
        self._ahead: Optional[tuple[tuple[int, int], Future]] = None

    def prepare(self, consumed: int, grad_accum: int) -> None:
        """Start collating the step that begins at row `consumed` with `grad_accum` micro-batches."""
        self.idle()
        self._ahead = ((consumed, grad_accum), self._pool.submit(
            collated_micro_batches, self.rows, consumed, grad_accum, self.topology, self.micro_batch_size))

    def take(self, consumed: int, grad_accum: int) -> list[dict]:
        """The collated micro-batches of that step: the prepared ones if they are for it, else made now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (consumed, grad_accum):
            return ahead[1].result()
        if ahead is not None:
            ahead[1].result()  # a step prepared for another batch size: let it finish before reading rows here
        return collated_micro_batches(self.rows, consumed, grad_accum, self.topology, self.micro_batch_size)

    def idle(self) -> None:
        """Wait until no step is being prepared (the result, if any, is kept)."""
        if self._ahead is not None:
            self._ahead[1].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


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
        self.topology = Topology.create(config.parallel.tp, config.parallel.pp, config.parallel.cp, config.parallel.ep)
        model_parallel_seed(config.train.seed, self.topology)
        self.dataset = build_sequences(config.data, config.train.seed)
        if config.model.vocab_size < self.dataset.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size} cannot hold the tokenizer's "
                              f"{self.dataset.tokenizer.vocab_size} ids: train() takes the config preflight() returns")
        self.run_dir = Path(config.train.run_dir)
        self.owned = start_run_dir(config, resolve_paths(config.data)[1])  # run_dir locked until run() ends
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.values = StepValues()  # the step's one device-to-host read (trainer/engine/step_values.py)
        built = build_engine(config, self.topology, self.world_size, self.values)
        self.engine, self.steps, self.own_clipping = built.engine, built.steps, built.clipping
        self.experts = ExpertBalancing(self.engine.module, config.model, self.topology) \
            if config.model.moe_num_experts else None
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
        self.next_rows = NextStepRows(self.dataset, self.topology, config.parallel.micro_batch_size)
        self.stop_requested = False
        self.preemption: Optional[PreemptionHandler] = None
        self.consumed = consumed_samples_at(self.step, config)
        self.flops_per_token = train_flops_per_token(config.model, config.data.seq_length, config.parallel.tp)
        self.nonfinite = NonFiniteSteps(config.train.max_nonfinite_in_a_row)
        self.valid = build_sequences(config.data, config.train.seed, split="valid") if config.data.valid_fraction > 0 \
            else None
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
            batches, counts = micro_batches(collated_micro_batches(self.valid, index * batch_size, grad_accum,
                                                                   self.topology, config.parallel.micro_batch_size),
                                            self.topology, mtp=config.model.mtp_layers > 0)
            # N = normaliser * GAS * dp * cp (trainer/engine/step_loss.py)
            loss_tokens = float(counts.normaliser) * grad_accum * loss_replicas(self.topology)
            nll += float(self.steps.eval_batch(batches, grad_accum)) * loss_tokens  # the batch's token mean * N
            tokens += loss_tokens
        loss = nll / tokens
        extra = self.evaluations() if self.evaluations else {}
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 80.0)), **extra}

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics record. The host reads the device once, after the step has
        been queued (trainer/engine/step_values.py): loss, gradient norm, real tokens and the stop flag."""
        config, engine, values = self.config, self.engine, self.values
        batch_size = global_batch_at(self.step, config)
        if batch_size * self.topology.cp != engine.train_batch_size():  # DeepSpeed's count: engine/ds_config.py
            engine.set_train_batch_size(batch_size * self.topology.cp)
        skipped_before, lr = engine.skipped_steps, engine.get_lr()[0]
        values.start()
        start = time.perf_counter()
        batches, counts = micro_batches(self.next_rows.take(self.consumed, batch_size // self.unit), self.topology,
                                        mtp=config.model.mtp_layers > 0)
        if self.step + 1 < config.train.steps:
            self.next_rows.prepare(self.consumed + batch_size, global_batch_at(self.step + 1, config) // self.unit)
        if self.experts:
            fp16 = config.train.precision == "fp16"
            self.experts.start_step(len(batches), deepspeed_compat.loss_scale(engine.optimizer) if fp16 else 1.0)
        loss = self.steps.train_batch(batches)
        grad_norm = self.own_clipping.norm if self.own_clipping else engine.get_global_grad_norm()
        stop = self.preemption.stop_flag(engine.device) if self.preemption is not None else False
        read = values.read(loss=loss, grad_norm=grad_norm, real_tokens=counts.real_tokens, stop=stop)
        terms = self._loss_terms()
        elapsed = time.perf_counter() - start
        self.step += 1
        self.consumed += batch_size
        self.stop_requested = bool(read["stop"])
        loss, grad_norm, tokens = read["loss"], read["grad_norm"], read["real_tokens"]
        skipped = engine.skipped_steps > skipped_before or not (is_finite(loss) and is_finite(grad_norm))
        self.nonfinite.record(skipped)
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "padding_fraction": 1.0 - tokens / (batch_size * config.data.seq_length),
                  "tokens_per_s": tokens / elapsed,
                  "tflops": tokens * self.flops_per_token / elapsed / self.world_size / 1e12,
                  "batch_size": batch_size, "consumed_samples": self.consumed,
                  "skipped": int(skipped), "skipped_total": self.nonfinite.total, "restarts": self.restarts, **terms}
        if config.train.precision == "fp16":
            record["loss_scale"] = deepspeed_compat.loss_scale(engine.optimizer)
        if self.experts:
            record.update(self.experts.finish_step(update_bias=not skipped))
        return record

    def _loss_terms(self) -> dict[str, float]:
        """The terms the loss recorded in this step (GLMLoss.take_recorded: mtp_loss), each the mean over the
        step's micro-batches and its dp x cp ranks (DeepSpeed's data-parallel ranks, as for `loss`: each cp rank
        holds its chunks' share): with the step's normaliser in every micro-batch that is the term's mean over all
        its loss tokens, as `loss` is. Only the last pipeline stage computes the loss: the
        terms are summed over the pipeline ranks, where the others add zero, so that global rank 0, which writes
        them, has them (a collective over the dp x cp and pp groups on every rank)."""
        loss_fn = getattr(self.engine.module, "loss_fn", None)
        loss_fn = getattr(loss_fn, "loss_fn", loss_fn)  # PoisonedLoss wraps the loss
        if not getattr(loss_fn, "term_names", ()):
            return {}
        terms, calls = loss_fn.take_recorded()
        values = torch.stack([terms[name] / calls if calls else torch.zeros((), device=self.engine.device)
                              for name in loss_fn.term_names])  # [terms]
        sum_over_(mean_over_(values, group=self.topology.dp_cp_group), group=self.topology.pp_group)
        return dict(zip(loss_fn.term_names, values.tolist()))

    def _collective_fault(self, error: RuntimeError) -> TrainingFault:
        """A failed collective (a dead or hung peer) reported with this rank's place in the layout."""
        t = self.topology
        return TrainingFault(f"rank {self.rank} (pipeline stage {t.pp_rank}, tensor rank {t.tp_rank}, data rank "
                             f"{t.dp_rank}) stopped at step {self.step + 1}: {error}. If a peer rank died or hung, "
                             f"its own log names the cause; collectives time out after "
                             f"train.collective_timeout_minutes")

    def save(self) -> Path:
        self.next_rows.idle()  # the next step's rows are being read: the data position reads the dataset too
        return checkpoint.save(self.engine, self.checkpoint_dir, self.step, self.consumed,
                               keep=self.config.train.keep_checkpoints,
                               data_position=self.dataset.position(self.consumed), run_record=self._run_record(),
                               topology=self.topology)

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

    def _iteration(self, writer: MetricsWriter, progress) -> tuple[float, bool]:
        """One step with its evaluation, logging and checkpointing; returns (loss, stop requested)."""
        config = self.config
        record = self.train_step()
        every, last = config.train.eval_interval, self.step == config.train.steps
        if (every and self.step % every == 0) or (last and self.valid is not None):
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
        stop = self.stop_requested
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
            self.preemption = preemption
            while self.step < self.config.train.steps and not stopped:
                try:
                    loss, stopped = self._iteration(writer, progress)
                except RuntimeError as error:
                    raise self._collective_fault(error) from error
                losses.append(loss)
        self.next_rows.close()
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
