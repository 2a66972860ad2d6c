"""The DeepSpeed engine of a run: the plain engine on GLMTrainModel when parallel.pp = 1 (ZeRO 0-3, offload:
trainer/engine/plain.py), the pipeline engine on GLMPipeline otherwise (ZeRO <= 1: trainer/engine/pipeline.py).
Both get the same optimizer groups, LR schedule, clipping and fine-tuning freezes, and `steps` gives both the
pipeline engine's train_batch / eval_batch, so the training loop (trainer/engine/loop.py) is one."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import deepspeed
import torch

from trainer.config import Config
from trainer.engine import finetune
from trainer.engine.deepspeed_compat import (expert_blocks_kept, mark_step_skipped, skip_backward_allreduce,
                                             wrap_model_step, zero_partitions_experts)
from trainer.engine.ds_config import build_ds_config, uses_own_clipping, zero_init_arguments
from trainer.engine.ds_topology import DeepSpeedMPU
from trainer.engine.faults import is_finite
from trainer.engine.grad_norm import clip_grads_, counted_in_norm, is_expert_parallel
from trainer.engine.grad_reduce import GradReduction
from trainer.engine.optimizer import build_optimizer
from trainer.engine.pipeline import GLMPipeline
from trainer.engine.plain import GLMTrainModel, PipelineSteps, PlainSteps
from trainer.engine.schedule import lr_lambda
from trainer.engine.step_values import StepValues
from trainer.model.block import compile_blocks
from trainer.parallel.random import recompute
from trainer.parallel.topology import Topology


@dataclass
class RunEngine:
    engine: object
    """DeepSpeed's engine (deepspeed.initialize)."""
    steps: object
    """train_batch(micro_batches) -> loss, eval_batch(micro_batches, n) -> loss (PlainSteps or PipelineSteps)."""
    clipping: Optional["OwnClipping"]
    """The trainer's own gradient clipping where it replaces DeepSpeed's, else None."""


def build_module(config: Config, topology: Topology, ds_config: dict) -> torch.nn.Module:
    """GLMTrainModel (pp = 1; under ZeRO-3 built inside deepspeed.zero.Init, so each weight is partitioned as
    soon as its layer exists and the whole model is never on one device) or GLMPipeline."""
    seed, interval = config.train.seed, config.parallel.recompute_interval
    sp = config.parallel.sequence_parallel
    if topology.pp > 1:
        return GLMPipeline(config.model, topology, seed, recompute_interval=interval, recompute=recompute,
                           sequence_parallel=sp)
    if ds_config["zero_optimization"]["stage"] != 3:
        return GLMTrainModel(config.model, topology.tp_group, seed, interval, recompute, topology.ep_group, sp,
                             topology.cp_group)
    # Partitioned over the data-parallel ranks only: without data_parallel_group zero.Init partitions over the
    # whole world, so at tp > 1 a gathered weight would be pieced together from different tensor ranks' shards.
    mpu = DeepSpeedMPU(topology)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu,
                             data_parallel_group=mpu.get_data_parallel_group(), **zero_init_arguments(config)):
        module = GLMTrainModel(config.model, topology.tp_group, seed, interval, recompute, topology.ep_group, sp,
                               topology.cp_group)
    # ZeRO-3 gathers a weight only inside the forward of the module that owns it; the loss computes the logits
    # with the output weight (the word embedding when tied), which another module owns.
    deepspeed.zero.register_external_parameter(module.loss_fn, module.output_weight)
    return module


def build_engine(config: Config, topology: Topology, world_size: int,
                 step_values: Optional[StepValues] = None) -> RunEngine:
    """The engine of the run, its train/eval steps, and the trainer's clipping where DeepSpeed's is replaced
    (fp32 without ZeRO: the default with one data-parallel rank, engine/ds_config.py), which reads its gradient
    norm through `step_values` (the loop's: trainer/engine/step_values.py; its own if not given)."""
    ds_config = build_ds_config(config, world_size)
    module = build_module(config, topology, ds_config)
    if config.model.compile:
        compile_blocks(module)  # block by block, the mask and RoPE tables built outside (trainer/model/block.py)
    frozen = finetune.freeze(module, config)
    optimizer = build_optimizer(module, config.optim, frozen=frozen, ep=topology.ep)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    plain = topology.pp == 1
    zero = ds_config["zero_optimization"]["stage"] > 0
    with _experts_kept(module, topology, zero):
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                               mpu=DeepSpeedMPU(topology) if plain else None, config=ds_config)
    clipping = OwnClipping(engine, topology, config.optim.grad_clip, step_values or StepValues()) \
        if uses_own_clipping(config, world_size) else None
    # Expert parallelism without ZeRO: the trainer's own reduction (experts over edp) replaces DeepSpeed's
    # (engine/grad_reduce.py); ZeRO-1/2 reduces them over edp itself (_experts_kept).
    trainable = [param for param in module.parameters() if param.requires_grad]
    reduction = GradReduction(trainable, topology) if topology.ep > 1 and not zero else None
    before_step = _before_step(reduction, clipping)
    if plain:
        # the reported loss: the mean over DeepSpeed's data-parallel ranks, dp x cp (engine/step_loss.py)
        steps = PlainSteps(engine, topology.dp_cp_group, before_step=before_step,
                           reduces_itself=reduction is not None)
    else:
        steps = PipelineSteps(engine)
        if before_step is not None:
            wrap_model_step(engine, before=before_step)
        single_replica = topology.dp * topology.cp == 1  # DeepSpeed's data axis is dp x cp (engine/ds_topology.py)
        if (clipping is not None and single_replica) or reduction is not None:
            skip_backward_allreduce(engine)
    return RunEngine(engine, steps, clipping)


def _experts_kept(module: torch.nn.Module, topology: Topology, zero: bool) -> ContextManager:
    """Around deepspeed.initialize at ep > 1: each rank keeps its own block of routed experts through the engine's
    start-time broadcast, and under ZeRO-1/2 the optimizer partitions and reduces the experts' states and gradients
    over their expert-data group, the rest over dp x cp (engine/deepspeed_compat.py)."""
    if topology.ep == 1:
        return nullcontext()
    experts = [param for param in module.parameters() if is_expert_parallel(param)]
    if zero:
        # The groups themselves, size 1 included: DeepSpeed reads a None group (topology.edp_group at edp = 1) as
        # the whole world, which would sum different ranks' experts.
        groups = topology.process_groups
        return zero_partitions_experts(experts, topology.ep, groups["ep"], groups["edp"])
    return expert_blocks_kept(experts)


def _before_step(reduction: Optional[GradReduction], clipping: Optional["OwnClipping"]) -> Optional[Callable]:
    """The work before each optimizer step, as one call `run(loss=None)`: the experts' own gradient reduction
    (expert parallelism), then the trainer's clipping, which reads the step's loss (where it is known by then)
    with the norm; None when there is neither."""
    if reduction is None and clipping is None:
        return None

    def run(loss: Optional[torch.Tensor] = None) -> None:
        if reduction is not None:
            reduction.reduce()
        if clipping is not None:
            clipping.clip(loss)

    return run


class OwnClipping:
    """fp32 without ZeRO: DeepSpeed's clip_fp32_gradients counts the pipeline's tied embedding twice and drops
    the replicated weights of later pipeline stages, sums in fp32 (engine/grad_norm.py says why that is not
    enough), and nothing skips a non-finite step. This replaces it (DeepSpeed's gradient_clipping is set to 0:
    ds_config.py) with the layout-aware norm. A non-finite norm drops the gradients, so AdamW leaves every weight
    and moment as it was, and marks the step skipped, so the engine counts it and holds the LR schedule (as
    under ZeRO). Whether to skip is decided on the host, so the norm is read here, with the step's loss and its
    other values (trainer/engine/step_values.py: the step's one read); `norm` keeps it on the device too."""

    def __init__(self, engine, topology: Topology, max_norm: float, step_values: StepValues):
        self.norm: Optional[torch.Tensor] = None
        self._values = step_values
        self._params = [p for p in engine.module.parameters() if p.requires_grad]
        self._counted = counted_in_norm(self._params, topology.tp_rank)
        self._group, self._ep_group = topology.model_group, topology.ep_group
        self._max_norm, self._device = max_norm, engine.device
        self._optimizer = engine.optimizer

    def clip(self, loss: Optional[torch.Tensor] = None) -> None:
        """Clip before the optimizer step; `loss`, the step's (where it is known by now), is read with the norm."""
        self.norm = clip_grads_(self._params, self._counted, self._max_norm, self._group, self._device,
                                self._ep_group)
        known = {} if loss is None else {"loss": loss}  # the pipeline engine has its loss after the step only
        skipped = not is_finite(self._values.read(grad_norm=self.norm, **known)["grad_norm"])
        mark_step_skipped(self._optimizer, skipped)
        if skipped:
            for param in self._params:
                param.grad = None
