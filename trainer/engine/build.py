"""The DeepSpeed engine of a run: the plain engine on GLMTrainModel when parallel.pp = 1 (ZeRO 0-3, offload:
trainer/engine/plain.py), the pipeline engine on GLMPipeline otherwise (ZeRO <= 1: trainer/engine/pipeline.py).
Both get the same optimizer groups, LR schedule, clipping and fine-tuning freezes, and `steps` gives both the
pipeline engine's train_batch / eval_batch, so the training loop (trainer/engine/loop.py) is one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import deepspeed
import torch

from trainer.config import Config
from trainer.engine import finetune
from trainer.engine.deepspeed_compat import mark_step_skipped, skip_single_replica_allreduce, wrap_model_step
from trainer.engine.ds_config import build_ds_config, uses_own_clipping, zero_init_arguments
from trainer.engine.ds_topology import DeepSpeedMPU
from trainer.engine.faults import is_finite
from trainer.engine.grad_norm import clip_grads_, counted_in_norm
from trainer.engine.optimizer import build_optimizer
from trainer.engine.pipeline import GLMPipeline
from trainer.engine.plain import GLMTrainModel, PipelineSteps, PlainSteps
from trainer.engine.schedule import lr_lambda
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
    if topology.pp > 1:
        return GLMPipeline(config.model, topology, seed, recompute_interval=interval, recompute=recompute)
    if ds_config["zero_optimization"]["stage"] != 3:
        return GLMTrainModel(config.model, topology.tp_group, seed, interval, recompute, topology.cp_group)
    # Partitioned over the data-parallel ranks only: without data_parallel_group zero.Init partitions over the
    # whole world, so at tp > 1 a gathered weight would be pieced together from different tensor ranks' shards.
    mpu = DeepSpeedMPU(topology)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu,
                             data_parallel_group=mpu.get_data_parallel_group(), **zero_init_arguments(config)):
        module = GLMTrainModel(config.model, topology.tp_group, seed, interval, recompute, topology.cp_group)
    # ZeRO-3 gathers a weight only inside the forward of the module that owns it; the loss computes the logits
    # with the output weight (the word embedding when tied), which another module owns.
    deepspeed.zero.register_external_parameter(module.loss_fn, module.output_weight)
    return module


def build_engine(config: Config, topology: Topology, world_size: int) -> RunEngine:
    """The engine of the run, its train/eval steps, and the trainer's clipping where DeepSpeed's is replaced
    (fp32 without ZeRO: the default with one data-parallel rank, engine/ds_config.py)."""
    ds_config = build_ds_config(config, world_size)
    module = build_module(config, topology, ds_config)
    frozen = finetune.freeze(module, config)
    optimizer = build_optimizer(module, config.optim, frozen=frozen)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    plain = topology.pp == 1
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           mpu=DeepSpeedMPU(topology) if plain else None, config=ds_config)
    clipping = OwnClipping(engine, topology, config.optim.grad_clip) if uses_own_clipping(config, world_size) else None
    if plain:
        # the reported loss: the mean over DeepSpeed's data-parallel ranks, dp x cp (engine/step_loss.py)
        steps = PlainSteps(engine, topology.dp_cp_group, before_step=clipping.clip if clipping else None)
    else:
        steps = PipelineSteps(engine)
        if clipping is not None:
            wrap_model_step(engine, before=clipping.clip)
            if topology.dp * topology.cp == 1:  # DeepSpeed's data axis is dp x cp (engine/ds_topology.py)
                skip_single_replica_allreduce(engine)
    if config.model.compile:
        engine.compile()  # torch.compile (the pipeline engine compiles layer by layer)
    return RunEngine(engine, steps, clipping)


class OwnClipping:
    """fp32 without ZeRO: DeepSpeed's clip_fp32_gradients counts the pipeline's tied embedding twice and drops
    the replicated weights of later pipeline stages, sums in fp32 (engine/grad_norm.py says why that is not
    enough), and nothing skips a non-finite step. This replaces it (DeepSpeed's gradient_clipping is set to 0:
    ds_config.py) with the layout-aware norm. A non-finite norm drops the gradients, so AdamW leaves every weight
    and moment as it was, and marks the step skipped, so the engine counts it and holds the LR schedule (as
    under ZeRO)."""

    def __init__(self, engine, topology: Topology, max_norm: float):
        self.norm: Optional[float] = None
        self._params = [p for p in engine.module.parameters() if p.requires_grad]
        self._counted = counted_in_norm(self._params, topology.tp_rank)
        self._group = topology.model_group
        self._max_norm, self._device = max_norm, engine.device
        self._optimizer = engine.optimizer

    def clip(self) -> None:
        norm = clip_grads_(self._params, self._counted, self._max_norm, self._group, self._device).item()
        self.norm = norm
        skipped = not is_finite(norm)
        mark_step_skipped(self._optimizer, skipped)
        if skipped:
            for param in self._params:
                param.grad = None
