"""One glm-bench run: build the contenders on this process (with a mixture-of-experts config, its dense
counterpart on the same engine path too: trainer/bench/dense_counterpart.py), time them in rounds, then (with a
corpus) the engine on real batches packed and unpacked, then the pipeline."""
from __future__ import annotations

import argparse
from typing import Optional

from deepspeed.accelerator import get_accelerator

from trainer.bench.batches import synthetic_step
from trainer.bench.dense_counterpart import counterpart_facts, dense_counterpart
from trainer.bench.packing import SETTINGS, real_step, time_packing
from trainer.bench.pipeline import pipeline_efficiency
from trainer.bench.report import DensePair, build_report, packing_figures
from trainer.bench.runners import EngineRunner, bare_loop_runner, gpt2_runner
from trainer.bench.timing import peak_memory_of, round_robin, timed
from trainer.config import Config
from trainer.engine.distributed import init_distributed, local_device
from trainer.engine.flops import peak_tflops, train_flops_per_token
from trainer.parallel.random import model_parallel_seed
from trainer.parallel.topology import Topology


def packing_comparison(config: Config, engine: EngineRunner, args: argparse.Namespace, grad_accum: int,
                       flops_per_token: int, topology: Topology) -> Optional[dict]:
    """With a corpus (data.path): the engine on the first real step, packed and unpacked, in alternating
    rounds -> packing_figures(); None without one."""
    if not config.data.path:
        return None
    steps = {name: real_step(config, packing, grad_accum, topology, local_device()) for name, packing in SETTINGS.items()}
    timings = time_packing(engine, steps, args.warmup, args.steps)
    return packing_figures(steps, timings, flops_per_token, config.data.path)


def run_bench(config: Config, args: argparse.Namespace, device: str, memory_notes: dict) -> dict:
    """The report of module trainer.bench.report for `config` (already on one process, tp = pp = 1)."""
    init_distributed(config.train.collective_timeout_minutes)
    topology = Topology.create(1, 1)
    model_parallel_seed(config.train.seed, topology)
    m, grad_accum = config.model, config.grad_accum_steps(1)
    batches = synthetic_step(grad_accum, config.parallel.micro_batch_size, config.data.seq_length,
                             m.vocab_size, topology, local_device(), mtp=m.mtp_layers > 0)
    engine = EngineRunner(config, topology, 1, batches)
    _, peak_memory = peak_memory_of(engine.step, args.warmup)  # before any other model exists
    contenders = {}
    if not args.no_bare:
        contenders["bare_loop"] = bare_loop_runner(config, batches, local_device()).step
    if not args.no_hf:
        contenders["hf_gpt2"] = gpt2_runner(config, batches, local_device()).step
    dense = None
    if m.moe_num_experts and not args.no_dense:  # the MoE engine against the dense one of its active parameters
        dense_config = dense_counterpart(config)
        contenders["dense"] = EngineRunner(dense_config, topology, 1, batches).step
    pairs, engine_alone = {}, None
    for name, step in contenders.items():
        # Each ratio from its own rounds of the engine and this contender only: a third contender's heap
        # traffic (GPT-2 frees and re-faults ~40 MB of logits a step) then falls on neither of the two.
        for _ in range(args.warmup):
            timed(step)
        rounds = round_robin({"engine": engine.step, name: step}, args.steps)
        pairs[name] = (rounds["engine"], rounds[name])
    if not contenders:
        engine_alone = round_robin({"engine": engine.step}, args.steps)["engine"]
    flops_per_token = train_flops_per_token(m, config.data.seq_length)
    causal_flops_per_token = train_flops_per_token(m, config.data.seq_length, attention="causal")
    if "dense" in pairs:
        dense_m = dense_config.model
        dense = DensePair(*pairs.pop("dense"), train_flops_per_token(dense_m, config.data.seq_length),
                          train_flops_per_token(dense_m, config.data.seq_length, attention="causal"),
                          counterpart_facts(m, dense_m))
    packing = packing_comparison(config, engine, args, grad_accum, flops_per_token, topology)
    pipeline = None
    if not args.no_pipeline:
        pipeline = pipeline_efficiency(config, args.pipeline_micro_batches, args.steps, args.warmup)
    on_cpu = get_accelerator().device_name() == "cpu"
    context = {"config": args.config, "overrides": args.overrides, "device": device,
               "precision": config.train.precision, "compile": config.model.compile,
               "steps": args.steps, "warmup": args.warmup,
               "shape": {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
                         "num_attention_heads": m.num_attention_heads, "ffn_size": m.ffn_size,
                         "seq_length": config.data.seq_length, "padded_vocab_size": m.padded_vocab_size(1),
                         "micro_batch_size": config.parallel.micro_batch_size, "grad_accum": grad_accum,
                         "recompute_interval": config.parallel.recompute_interval},
               "memory_note": memory_notes["cpu" if on_cpu else "gpu"]}
    tokens_per_step = grad_accum * config.parallel.micro_batch_size * config.data.seq_length
    return build_report(pairs, tokens_per_step, flops_per_token, peak_tflops(args.peak_tflops, config.train.precision),
                        peak_memory, context, pipeline, engine_alone, packing, causal_flops_per_token, dense)
