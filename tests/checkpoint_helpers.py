"""Shared pieces of the checkpoint tests: a tiny GLM config, DeepSpeed engines on gloo ranks, fixed inputs."""
from __future__ import annotations

import hashlib

import torch

from trainer.config import Config, load_config
from trainer.model.mask import segments_of_sep

VOCAB = 300
# GeGLU and 4 heads so that tp=2 splits fused QKV and both GeGLU halves; dropout 0 (configs/glm-debug.yaml).
OVERRIDES = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", f"model.vocab_size={VOCAB}",
             "model.max_sequence_length=16", "model.mlp=geglu", "data.seq_length=16",
             "parallel.micro_batch_size=2", "parallel.global_batch_size=4"]


def tiny_config(*extra: str) -> Config:
    return load_config("configs/glm-debug.yaml", OVERRIDES + list(extra))


def glm_inputs(batch: int = 2, seq: int = 12, sep: int = 7) -> tuple[torch.Tensor, ...]:
    """Fixed blank-infilling inputs: Part A of `sep` tokens, then a Part B span at position 3."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    positions = torch.cat([torch.arange(sep), torch.full((seq - sep,), 3)]).expand(batch, seq).contiguous()
    blocks = torch.cat([torch.zeros(sep, dtype=torch.long), torch.arange(1, seq - sep + 1)]).expand(batch, seq).contiguous()
    return ids, positions, blocks, segments_of_sep(torch.full((batch,), sep), seq)


def build_engine(config: Config, world_size: int):
    """The trainer's DeepSpeed pipeline engine (trainer.engine) on an initialised gloo world."""
    import deepspeed

    from trainer.engine.ds_config import build_ds_config
    from trainer.engine.optimizer import build_optimizer
    from trainer.engine.pipeline import GLMPipeline
    from trainer.engine.schedule import lr_lambda
    from trainer.parallel.random import model_parallel_seed
    from trainer.parallel.topology import Topology

    deepspeed.init_distributed(dist_backend="gloo")
    topology = Topology.create(config.parallel.tp, config.parallel.pp)
    model_parallel_seed(config.train.seed, topology)
    module = GLMPipeline(config.model, topology, config.train.seed)
    optimizer = build_optimizer(module, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_ds_config(config, world_size))
    return engine, topology


def perturb_(named_params, config, tp_rank: int, scale: float = 0.05) -> None:
    """Add seeded noise to (canonical name, parameter) pairs so the weights differ from the init. The noise
    is equal on every copy of a parameter (seeded by its name, and by the tensor rank for split ones) and
    zero on the vocabulary padding rows."""
    from trainer.checkpoint.layout import rule_for

    for name, param in named_params:
        rule = rule_for(name, config)
        digest = hashlib.sha256(f"{name}/{tp_rank if rule.dim is not None else 0}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))
        noise = torch.randn(param.shape, generator=generator) * scale
        if rule.vocab:
            noise[max(0, VOCAB - tp_rank * param.shape[0]):] = 0
        with torch.no_grad():
            param.add_(noise)
