"""model.compile: every block's math compiled on its own (torch.compile, inductor on CPU) trains to the same losses
as the eager model through the trainer's engine, and the compiled region holds the whole block: the mask and
RoPE lookups stay outside it, so it compiles without a graph break.

Kept short (2 layers, 3 optimizer steps of 2 micro-batches): inductor compiles the block's forward and backward
once. Measured 2026-12-06 on the 2-core sandbox: 37 s of CPU time, 3 min 19 s wall at a load average of ~20."""
import torch
from torch.testing import assert_close

from tests.distributed import run_distributed
from tests.glm_processes import REPO, TINY

STEPS = 3


def _losses(config, compiled: bool) -> tuple[list[float], int]:
    from trainer.bench.batches import synthetic_step
    from trainer.engine.build import build_engine
    from trainer.parallel.random import model_parallel_seed
    from trainer.parallel.topology import Topology

    config.model.compile = compiled
    topology = Topology.create(1, 1)
    model_parallel_seed(config.train.seed, topology)
    built = build_engine(config, topology, 1)
    blocks = [m for m in built.engine.module.modules() if type(m).__name__ == "GLMBlock"]
    batches = synthetic_step(config.grad_accum_steps(1), config.parallel.micro_batch_size, config.data.seq_length,
                             config.model.vocab_size)
    losses = [built.steps.train_batch(batches).item() for _ in range(STEPS)]
    return losses, sum(block._compiled_layer is not None for block in blocks)


def _compiled_equals_eager(rank: int, world_size: int) -> None:
    from torch._dynamo.utils import counters

    from trainer.config import load_config

    config = load_config(REPO / "configs" / "glm-debug.yaml", TINY + ["model.vocab_size=300"])
    eager, _ = _losses(config, compiled=False)
    counters.clear()
    compiled, compiled_blocks = _losses(config, compiled=True)
    assert compiled_blocks == config.model.num_layers
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-5, rtol=0)


def test_compiled_blocks_train_to_the_eager_losses():
    run_distributed(_compiled_equals_eager, 1)
