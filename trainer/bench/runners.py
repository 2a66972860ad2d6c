"""The three contenders of glm-bench, each a `step()` that trains one optimizer step on the same batches:
- EngineRunner: the trainer's DeepSpeed engine (trainer.engine.build.build_engine: the plain engine at pp = 1);
- bare_loop_runner: the same GLMModel, GLMLoss, AdamW groups, LR schedule and gradient clipping in a plain
  PyTorch loop, with the engine's activation recomputation: the engine's overhead is the difference;
- gpt2_runner: HF transformers' GPT-2 of the same depth, width, heads, MLP width, sequence length, vocabulary
  and dropout, in the same plain loop: the peer a user would otherwise pick.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from trainer.bench.batches import MicroBatch
from trainer.config import Config
from trainer.engine.build import build_engine
from trainer.engine.moe_balance import ExpertBalancing
from trainer.engine.optimizer import build_optimizer
from trainer.engine.plain import GLMTrainModel
from trainer.engine.schedule import lr_lambda
from trainer.engine.step_values import StepValues
from trainer.errors import ConfigError
from trainer.model.block import compile_blocks
from trainer.parallel.random import recompute
from trainer.parallel.topology import Topology

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(config: Config) -> torch.dtype:
    """The parameter dtype of the plain loops: the engine's precision (fp16 needs loss scaling, which a
    plain loop would have to add, so the bench leaves it out)."""
    if config.train.precision not in DTYPES:
        raise ConfigError(f"glm-bench runs fp32 or bf16, got train.precision={config.train.precision}: "
                          f"set --set train.precision=bf16 (GPU) or fp32 (CPU)")
    return DTYPES[config.train.precision]


class EngineRunner:
    """One optimizer step of the DeepSpeed engine over the step's micro-batches, built and driven as the Trainer
    does (trainer/engine/loop.py train_step): build_engine (engine, ZeRO stage, clipping, torch.compile), the
    step's values read once (StepValues), and with a mixture of experts the expert balancing around the step."""

    def __init__(self, config: Config, topology: Topology, world_size: int, batches: list[MicroBatch]):
        self.values = StepValues()
        built = build_engine(config, topology, world_size, self.values)
        self.engine, self.steps, self.clipping = built.engine, built.steps, built.clipping
        self.experts = ExpertBalancing(self.engine.module, config.model, topology) \
            if config.model.moe_num_experts else None
        self.batches = batches

    def step(self) -> float:
        return self.step_on(self.batches)

    def step_on(self, batches: list[MicroBatch]) -> float:
        """One optimizer step on `batches` instead (the real batches of trainer.bench.packing) -> its loss."""
        self.values.start()
        if self.experts:
            self.experts.start_step(len(batches))
        loss = self.values.read(loss=self.steps.train_batch(batches))["loss"]
        if self.experts:
            self.experts.finish_step(update_bias=True)
        return loss


class PlainLoop:
    """forward/backward over the micro-batches (loss / grad_accum each), clip, AdamW step, LR step."""

    def __init__(self, model: torch.nn.Module, loss_of: Callable[[MicroBatch], torch.Tensor], config: Config,
                 batches: list[MicroBatch]):
        self.model, self.loss_of, self.batches = model, loss_of, batches
        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = LambdaLR(self.optimizer, lr_lambda(config))
        self.grad_clip = config.optim.grad_clip

    def step(self) -> float:
        total = None
        for micro_batch in self.batches:
            loss = self.loss_of(micro_batch) / len(self.batches)
            loss.backward()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)


def bare_loop_runner(config: Config, batches: list[MicroBatch], device: torch.device | str) -> PlainLoop:
    """The plain engine's module (GLMTrainModel: the model's one composition, its loss and activation
    recomputation) + AdamW, without DeepSpeed: what the engine costs is the difference."""
    model = GLMTrainModel(config.model, None, config.train.seed, config.parallel.recompute_interval,
                          recompute).to(device, compute_dtype(config))
    if config.model.compile:  # block by block, as the engine (trainer/engine/build.py)
        compile_blocks(model)

    def loss_of(micro_batch: MicroBatch) -> torch.Tensor:
        inputs, targets = micro_batch
        return model(inputs, targets)

    return PlainLoop(model, loss_of, config, batches)


def gpt2_like(config: Config):
    """HF GPT-2 (randomly initialised from a GPT2Config, nothing downloaded) of the GLM's shape."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ConfigError("the HF GPT-2 comparison needs transformers: pip install 'glm-trainer[bench]', "
                          "or pass --no-hf") from None
    m = config.model
    gpt2 = GPT2Config(vocab_size=m.padded_vocab_size(1), n_positions=config.data.seq_length, n_embd=m.hidden_size,
                      n_layer=m.num_layers, n_head=m.num_attention_heads, n_inner=m.ffn_size,
                      activation_function="gelu_new", resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout,
                      attn_pdrop=m.attention_dropout, layer_norm_epsilon=m.layernorm_epsilon,
                      initializer_range=m.init_std, use_cache=False, bos_token_id=0, eos_token_id=0,
                      attn_implementation="sdpa")
    return GPT2LMHeadModel(gpt2)


def gpt2_runner(config: Config, batches: list[MicroBatch], device: torch.device | str) -> PlainLoop:
    """HF GPT-2 on the same token ids, by its own causal-LM loss (labels = input_ids, shifted inside)."""
    model = gpt2_like(config).to(device, compute_dtype(config)).train()
    if config.model.compile:
        model.compile()

    def loss_of(micro_batch: MicroBatch) -> torch.Tensor:
        input_ids = micro_batch[0][0]
        return model(input_ids=input_ids, labels=input_ids).loss

    return PlainLoop(model, loss_of, config, batches)
