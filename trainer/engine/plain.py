"""GLM on DeepSpeed's own engine (parallel.pp = 1): the module it wraps, and one optimizer step.

DeepSpeed's pipeline engine allows ZeRO-1 at most; its plain engine (deepspeed.initialize on an
nn.Module) runs ZeRO-2, ZeRO-3 and offload. With one pipeline stage the trainer therefore wraps
`GLMTrainModel`, the single-process GLMModel with its loss, and drives it with the engine's public
forward / backward / step. A step here is what the pipeline engine's train_batch is (trainer/engine/loop.py
gives both the same micro-batches): DeepSpeed divides each micro-batch's loss by the gradient accumulation
steps and averages the gradients over the data-parallel ranks, and the reported loss is the same mean over
the step's micro-batches and the data-parallel ranks. Each micro-batch's loss carries the factor that undoes
both (trainer/engine/step_loss.py), so loss and gradient are the step's mean over all its loss tokens.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

from contextlib import nullcontext

import torch

from trainer.model import GLMLoss, GLMModel
from trainer.model.config import ModelConfig
from trainer.model.embedding import Activations
from trainer.parallel.comm import mean_over_


class GLMTrainModel(GLMModel):
    """GLMModel whose forward returns the loss: (inputs, target) in the pipeline's format
    (trainer/engine/loop.py: pipeline_format) -> GLMLoss of the output head's hand-over, a 0-dim fp32 tensor.
    Parameter names are GLMModel's, which are the canonical names (trainer/checkpoint/layout.py).

    With recompute_interval k > 0 the blocks run in groups of k under `recompute` (activation
    recomputation: only each group's input is kept for backward), as the pipeline's
    activation_checkpoint_interval does."""

    def __init__(self, config: ModelConfig, tp_group=None, seed: int = 0, recompute_interval: int = 0,
                 recompute: Optional[Callable] = None, ep_group=None, sequence_parallel: bool = False,
                 cp_group=None):
        super().__init__(config, tp_group, seed, ep_group, sequence_parallel, cp_group)
        self.loss_fn = GLMLoss(config, tp_group)
        self.recompute_interval = recompute_interval
        self.recompute = recompute

    def run_blocks(self, blocks: Sequence[torch.nn.Module], activations: Activations,
                   kv_caches: Optional[Sequence] = None) -> Activations:
        k = self.recompute_interval
        if not (k and self.recompute and self.training and torch.is_grad_enabled()) or kv_caches is not None:
            return super().run_blocks(blocks, activations, kv_caches)
        for start in range(0, len(blocks), k):
            group = blocks[start:start + k]

            def run(*inputs, group=group):
                for layer in group:
                    inputs = layer(inputs)
                return inputs

            activations = self.recompute(run, *activations)
        return activations

    def forward(self, inputs: Activations, target: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.loss_fn(self.head_inputs(inputs), target)


def _mean_over_data_parallel(total: torch.Tensor, count: int, dp_group) -> torch.Tensor:
    """sum of this rank's micro-batch losses -> the mean over every rank's micro-batches."""
    mean = total.detach().clone() / count
    return mean_over_(mean, group=dp_group)


class PlainSteps:
    """train_batch / eval_batch on DeepSpeed's plain engine, with the pipeline engine's meaning.

    `before_step(loss)` runs once per optimizer step after the last backward, with the step's loss (a 0-dim
    tensor on the device): on the gradients DeepSpeed has reduced over the data-parallel ranks (the trainer's own
    clipping where it replaces DeepSpeed's), or, with `reduces_itself`, instead of DeepSpeed's reduction (expert
    parallelism: engine/grad_reduce.py). Nothing here reads a device value on the host; each micro-batch's copy
    to the device is queued (non-blocking, from the pinned host memory the loop collates into) before the
    previous one's forward, so the host never waits for a copy."""

    def __init__(self, engine, dp_group, before_step: Optional[Callable[[torch.Tensor], None]] = None,
                 reduces_itself: bool = False):
        self.engine = engine
        self.dp_group = dp_group
        self.before_step = before_step
        # One data-parallel rank: DeepSpeed's gradient all-reduce would copy the gradients through flat buffers
        # onto themselves. engine.no_sync() skips it without ZeRO (ZeRO fills its partitions in that reduction).
        self._skip_reduce = (reduces_itself or dp_group is None) and engine.zero_optimization_stage() == 0

    def train_batch(self, batches: Sequence[tuple]) -> torch.Tensor:
        engine = self.engine
        if not engine.module.training:  # after eval_batch; module.train() walks every submodule (~0.2 ms a step)
            engine.train()
        total, count = torch.zeros((), device=engine.device), len(batches)
        loss_mean = total
        upcoming = _to_device(batches[0], engine.device)
        for index in range(count):
            inputs, target = upcoming
            if index + 1 < count:  # the next micro-batch's copy, queued ahead of this one's work
                upcoming = _to_device(batches[index + 1], engine.device)
            loss = engine(inputs, target)
            with engine.no_sync() if self._skip_reduce else nullcontext():
                engine.backward(loss)
            total += loss.detach().float()
            if engine.is_gradient_accumulation_boundary():
                loss_mean = _mean_over_data_parallel(total, count, self.dp_group)
                if self.before_step is not None:
                    self.before_step(loss_mean)
            engine.step()
        return loss_mean

    @torch.no_grad()
    def eval_batch(self, batches: Iterable[tuple], num_micro_batches: int) -> torch.Tensor:
        engine = self.engine
        engine.eval()
        total = torch.zeros((), device=engine.device)
        for batch in batches:
            total += engine(*_to_device(batch, engine.device)).float()
        return _mean_over_data_parallel(total, num_micro_batches, self.dp_group)


def _to_device(batch: tuple, device) -> tuple:
    """(inputs, target) tuples of host tensors -> the same on `device`, copied without waiting (non_blocking:
    asynchronous where the host memory is pinned)."""
    return tuple(tuple(t.to(device, non_blocking=True) for t in tensors) for tensors in batch)


class PipelineSteps:
    """The pipeline engine's own train_batch / eval_batch (trainer/engine/pipeline.py)."""

    def __init__(self, engine):
        self.engine = engine

    def train_batch(self, batches: Iterable[tuple]) -> torch.Tensor:
        return self.engine.train_batch(iter(batches))

    def eval_batch(self, batches: Iterable[tuple], num_micro_batches: int) -> torch.Tensor:
        loss = self.engine.eval_batch(iter(batches), num_micro_batches=num_micro_batches)
        self.engine.module.train()
        return loss
