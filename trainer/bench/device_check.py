"""glm-bench --device-check --out DIR: one prepared run on an accelerator that says where a GLM step's time goes.

    glm-bench --device-check --out DIR [--config configs/glm-1.3b.yaml] [--smoke]

Four parts, in this order, each timed by wall clock around the accelerator's queue (trainer/bench/timing.py):
1. `gemm`: the bf16 matrix-multiply rate at the model's four GEMM shapes for one micro-batch of T = b s tokens,
   [T, h] x [h, (n + 2 g) d] (qkv), [T, h] x [h, h] (attention out), [T, h] x [h, k f] (MLP in, k = 2 when
   gated) and [T, f] x [f, h] (MLP out): the ceiling a step could reach. TFLOP/s = 2 M N K / seconds.
2. `attention`: FlexAttention (the GLM block mask) against SDPA (its additive mask) at the config's sequence
   length, one sample per row (sep = s/2) and packed (four samples a row), forward and forward + backward,
   and their agreement (largest absolute difference of outputs and input gradients). FlexAttention has no
   backward on CPU: there only its forward is timed.
3. `engine`: the trainer's engine alone (trainer/engine/build.py) at two micro-batch sizes, two micro-batches
   a step: tokens/s, TFLOP/s and MFU under both FLOP conventions (trainer/engine/flops.py), peak allocated
   memory. `python -m launch.device_memory DIR/device_check.json` adds launch/memory.py's estimate beside it
   (trainer/ does not import launch).
4. `profile`: one optimizer step of the last engine under torch.profiler, the time of its device kernels
   (CPU: its operators' own time) grouped by name into matmul, attention, optimizer and elementwise, and
   idle = the step's wall time minus all of them.
`--smoke` runs the same code on the CPU with configs/glm-debug.yaml's shape (fp32, tiny): the CI test.
Writes DIR/device_check.json and prints a table.
"""
from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator

from trainer.bench.batches import synthetic_step
from trainer.bench.runners import EngineRunner
from trainer.bench.timing import timed
from trainer.config import Config
from trainer.engine.flops import peak_tflops, train_flops_per_token
from trainer.model.attention import flex_glm_attention
from trainer.model.mask import GLMMask, segments_of_sep, stack_segments
from trainer.parallel.random import model_parallel_seed
from trainer.parallel.topology import Topology

KERNEL_GROUPS = (
    ("attention", re.compile(r"flex|attention|fmha|flash|sdpa|softmax", re.IGNORECASE)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|optimizer", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|xmma|linear|aten::mm", re.IGNORECASE)),
)
"""A kernel's group by its name, first match wins (attention before matmul: FlexAttention's kernels multiply
matrices too); anything else is elementwise."""


def median_seconds(step: Callable[[], object], repeats: int) -> float:
    """The median wall time of `repeats` calls after one untimed call."""
    step()  # warm-up: compilation, allocator, autotuning
    return statistics.median(timed(step) for _ in range(repeats))


def gemm_shapes(config: Config) -> dict[str, tuple[int, int, int]]:
    """The model's four GEMMs for one micro-batch as (M, K, N): [M, K] x [K, N]."""
    m = config.model
    tokens = config.parallel.micro_batch_size * config.data.seq_length
    h, f = m.hidden_size, m.ffn_size
    return {"qkv": (tokens, h, sum(m.qkv_rows)), "attention_out": (tokens, h, h),
            "mlp_in": (tokens, h, (2 if m.gated_mlp else 1) * f), "mlp_out": (tokens, f, h)}


def gemm_rates(config: Config, dtype: torch.dtype, device: torch.device | str, repeats: int) -> dict:
    """Part 1: each GEMM shape's median seconds and TFLOP/s = 2 M N K / seconds."""
    rates = {}
    for name, (m, k, n) in gemm_shapes(config).items():
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        seconds = median_seconds(lambda: torch.matmul(a, b), repeats)
        rates[name] = {"shape_mkn": [m, k, n], "seconds": seconds, "tflops": 2 * m * k * n / seconds / 1e12}
    return rates


def packed_rows(b: int, s: int) -> torch.Tensor:
    """segments [b, 2, s] of four samples a row (lengths s/8, 3s/8, s/4, s/4, each with sep at its half)."""
    lengths = [s // 8, 3 * s // 8, s // 4, s - s // 8 - 3 * s // 8 - s // 4]
    start, sep, at = [], [], 0
    for length in lengths:
        start += [at] * length
        sep += [at + length // 2] * length
        at += length
    row = torch.tensor(start), torch.tensor(sep)
    return stack_segments(row[0].expand(b, s), row[1].expand(b, s))


def attention_comparison(config: Config, dtype: torch.dtype, device: torch.device | str, repeats: int) -> dict:
    """Part 2: FlexAttention and SDPA on the same q [b, n, s, d], k, v [b, g, s, d], unpacked and packed rows:
    their forward and forward + backward seconds and the largest difference of outputs (and dq, dk, dv)."""
    m, b, s = config.model, config.parallel.micro_batch_size, config.data.seq_length
    n, g, d = m.num_attention_heads, m.num_kv_heads, m.head_dim
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, heads, s, d, generator=generator).to(device, dtype).requires_grad_()
               for heads in (n, g, g))
    grad_out = torch.randn(b, n, s, d, generator=generator).to(device, dtype)
    backward = torch.device(device).type != "cpu"  # FlexAttention has no CPU backward
    flex_inputs = (q, k, v) if backward else tuple(t.detach() for t in (q, k, v))
    results = {}
    rows = {"unpacked": segments_of_sep(torch.full((b,), s // 2), s), "packed": packed_rows(b, s)}
    for layout, segments in rows.items():
        mask = GLMMask(segments.to(device))
        block_mask, additive = mask.block_mask(), mask.additive(dtype)
        kernels = {"flex": lambda: flex_glm_attention(*flex_inputs, block_mask),
                   "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=g != n)}
        entry, outputs = {}, {}
        for name, kernel in kernels.items():
            with torch.no_grad():
                entry[f"{name}_forward_s"] = median_seconds(kernel, repeats)
            with_grad = backward or name == "sdpa"
            if with_grad:
                entry[f"{name}_forward_backward_s"] = median_seconds(lambda: kernel().backward(grad_out), repeats)
                q.grad = k.grad = v.grad = None
                out = kernel()
                out.backward(grad_out)
                outputs[name] = [out.detach(), q.grad, k.grad, v.grad]
                q.grad = k.grad = v.grad = None
            else:
                entry[f"{name}_forward_backward_s"] = None  # FlexAttention has no CPU backward
                with torch.no_grad():
                    outputs[name] = [kernel()]
        pairs = list(zip(outputs["flex"], outputs["sdpa"]))
        entry["max_abs_difference"] = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
        entry["compared"] = ["output", "dq", "dk", "dv"][:len(pairs)]
        results[layout] = entry
    return results


def engine_figures(config: Config, micro_batch: int, steps: int, peak: float | None) -> tuple[dict, EngineRunner]:
    """The engine alone at this micro-batch size, two micro-batches a step."""
    run = dataclasses.replace(config, parallel=dataclasses.replace(
        config.parallel, micro_batch_size=micro_batch, global_batch_size=2 * micro_batch))
    accelerator = get_accelerator()
    topology = Topology.create(1, 1)
    model_parallel_seed(run.train.seed, topology)
    batches = synthetic_step(2, micro_batch, run.data.seq_length, run.model.vocab_size, topology, _device(),
                             mtp=run.model.mtp_layers > 0)
    engine = EngineRunner(run, topology, 1, batches)
    accelerator.reset_peak_memory_stats()
    engine.step()  # warm-up (compilation where model.compile)
    seconds = statistics.median(timed(engine.step) for _ in range(steps))
    accelerator.memory_allocated()  # on CPU this samples the resident set into the peak
    tokens_per_s = 2 * micro_batch * run.data.seq_length / seconds
    figures = {"micro_batch_size": micro_batch, "step_s": seconds, "tokens_per_s": tokens_per_s,
               "peak_memory_bytes": int(accelerator.max_memory_allocated())}
    for suffix, attention in (("", "full"), ("_causal", "causal")):
        flops_per_token = train_flops_per_token(run.model, run.data.seq_length, attention=attention)
        tflops = tokens_per_s * flops_per_token / 1e12
        figures[f"flops_per_token{suffix}"], figures[f"tflops{suffix}"] = flops_per_token, tflops
        figures[f"mfu{suffix}"] = None if peak is None else tflops / peak
    return figures, engine


def kernel_group(name: str) -> str:
    """KERNEL_GROUPS' group of a kernel (or CPU operator) name."""
    return next((group for group, pattern in KERNEL_GROUPS if pattern.search(name)), "elementwise")


def profile_split(engine: EngineRunner) -> dict:
    """One step under torch.profiler: seconds per kernel group (module docstring) and idle."""
    on_cpu = get_accelerator().device_name() == "cpu"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if not on_cpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        timed(engine.step)
        wall = time.perf_counter() - start
    split = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "elementwise": 0.0}
    if on_cpu:  # leaf operators' own time
        for event in profiler.key_averages():
            if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
                split[kernel_group(event.key)] += event.self_cpu_time_total / 1e6
    else:  # the device's kernels
        for event in profiler.events():
            if event.device_type != torch.autograd.DeviceType.CPU and event.device_time_total > 0:
                split[kernel_group(event.name)] += event.device_time_total / 1e6
    split["idle"] = max(wall - sum(split.values()), 0.0)
    return {"step_s": wall, "seconds": split, "fraction": {key: value / wall for key, value in split.items()}}


def _device():
    from trainer.engine.distributed import local_device

    return local_device()


def run_device_check(config: Config, out: Path, smoke: bool, peak_name: str | None, source: dict) -> dict:
    """The four parts (module docstring) -> the report, written to out/device_check.json; source: the config
    file and overrides it was loaded from (launch.device_memory rebuilds the config from them)."""
    from trainer.engine.distributed import init_distributed

    init_distributed(config.train.collective_timeout_minutes)
    device = _device()
    dtype = torch.float32 if config.train.precision == "fp32" else torch.bfloat16
    peak = peak_tflops(peak_name, config.train.precision)
    repeats, steps = (2, 2) if smoke else (10, 5)
    micro_batches = (1, 2) if smoke else (config.parallel.micro_batch_size, 2 * config.parallel.micro_batch_size)
    started = time.perf_counter()
    report = {**source, "device": get_accelerator().device_name(), "torch": torch.__version__, "smoke": smoke,
              "precision": config.train.precision, "peak_tflops": peak, "peak_name": peak_name,
              "shape": {"num_layers": config.model.num_layers, "hidden_size": config.model.hidden_size,
                        "num_attention_heads": config.model.num_attention_heads,
                        "seq_length": config.data.seq_length, "micro_batch_size": config.parallel.micro_batch_size},
              "gemm": gemm_rates(config, dtype, device, repeats),
              "attention": attention_comparison(config, dtype, device, repeats), "engine": []}
    engine = None
    for micro_batch in micro_batches:
        engine = None  # the previous size's engine freed before the next is built
        get_accelerator().empty_cache()
        try:
            figures, engine = engine_figures(config, micro_batch, steps, peak)
        except torch.OutOfMemoryError as error:  # the larger size may not fit: say so, keep the other figures
            figures = {"micro_batch_size": micro_batch, "out_of_memory": str(error).splitlines()[0]}
        report["engine"].append(figures)
    report["profile"] = None if engine is None else profile_split(engine)
    report["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=2))
    return report


def to_text(report: dict) -> str:
    """The table glm-bench prints."""
    lines = [f"device check on {report['device']} (torch {report['torch']}, {report['precision']}"
             f"{', smoke' if report['smoke'] else ''}), {report['seconds']:.0f} s; shape {report['shape']}",
             f"{'GEMM':<16} {'M x K x N':<22} {'TFLOP/s':>9}"]
    for name, gemm in report["gemm"].items():
        lines.append(f"{name:<16} {' x '.join(map(str, gemm['shape_mkn'])):<22} {gemm['tflops']:>9.2f}")
    lines.append(f"{'attention':<16} {'flex fwd ms':>12} {'sdpa fwd ms':>12} {'flex f+b ms':>12} {'sdpa f+b ms':>12} "
                 f"{'max |diff|':>11}")
    for layout, entry in report["attention"].items():
        ms = lambda key: "n/a" if entry[key] is None else f"{1e3 * entry[key]:.3f}"
        lines.append(f"{layout:<16} {ms('flex_forward_s'):>12} {ms('sdpa_forward_s'):>12} "
                     f"{ms('flex_forward_backward_s'):>12} {ms('sdpa_forward_backward_s'):>12} "
                     f"{entry['max_abs_difference']:>11.2e}")
    lines.append(f"{'engine mb':<16} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU full':>9} {'MFU causal':>11} "
                 f"{'peak GiB':>9}")
    for entry in report["engine"]:
        if "out_of_memory" in entry:
            lines.append(f"{entry['micro_batch_size']:<16} out of memory")
            continue
        mfu = lambda key: "n/a" if entry[key] is None else f"{100 * entry[key]:.1f}%"
        lines.append(f"{entry['micro_batch_size']:<16} {entry['tokens_per_s']:>10.0f} {entry['tflops']:>9.3f} "
                     f"{mfu('mfu'):>9} {mfu('mfu_causal'):>11} {entry['peak_memory_bytes'] / 2 ** 30:>9.2f}")
    profile = report["profile"]
    if profile is None:
        return "\n".join(lines + ["profile: no engine step fitted"])
    lines.append(f"profile of one step ({profile['step_s']:.3f} s): " + ", ".join(
        f"{name} {100 * fraction:.1f}%" for name, fraction in profile["fraction"].items()))
    return "\n".join(lines)
