"""The figures of a glm-bench run, from the measured step times, and their text and JSON forms.

    tokens/s   = tokens per optimizer step / median step seconds
    TFLOP/s    = tokens/s * train FLOPs per token (trainer.engine.flops) / 1e12;  MFU = TFLOP/s / peak
    both ways: `tflops`, `mfu` count attention's full s x s square; `tflops_causal`, `mfu_causal` half of it
    (Megatron-LM's current convention, that of published MFU figures)
    vs_bare_loop = median over rounds of (engine step s / bare-loop step s)   (1.0 = no engine overhead)
    vs_hf_gpt2   = median over rounds of (GPT-2 step s / engine step s)      (= GLM tokens/s / GPT-2 tokens/s)
Each ratio comes from its own rounds, in which only the engine and that contender take turns.
Each ratio also comes as `<ratio>_cpu`, the same from process CPU seconds (on a shared CPU the steadier one).
Each contender also reports its median minor page faults per step (`page_faults_per_step`).
A mixture-of-experts config also reports its dense counterpart (trainer/bench/dense_counterpart.py) in `dense`:
    moe_vs_dense = median over rounds of (dense step s / MoE step s)      (= MoE tokens/s / dense tokens/s)
each model's TFLOP/s and MFU from its own active FLOPs per token.
With a corpus (data.path), `packing` holds the real batches' figures (trainer/bench/packing.py):
    real_tokens_per_s  = real (non-padding) tokens per step / median step seconds
    packed_vs_unpacked = median over rounds of (packed real tokens/s / unpacked real tokens/s)
"""
from __future__ import annotations

import json
import statistics
from typing import NamedTuple, Optional

from trainer.bench.packing import RealStep
from trainer.bench.timing import Spread, Timings, per_round_ratio
from trainer.engine.flops import FLOP_FORMULA


def throughput(timings: Timings, tokens_per_step: int, flops_per_token: int) -> dict:
    """Step timings -> their spread, tokens/s and TFLOP/s at the median wall-clock step."""
    step = Spread.of(timings.wall)
    tokens_per_s = tokens_per_step / step.median
    faults = statistics.median(timings.faults) if timings.faults else None
    return {"step_s": step.as_dict(), "seconds": timings.wall, "cpu_step_s": Spread.of(timings.cpu).as_dict(),
            "cpu_seconds": timings.cpu, "tokens_per_s": tokens_per_s, "tflops": tokens_per_s * flops_per_token / 1e12,
            "page_faults_per_step": faults}


def _ratios(report: dict, key: str, numerator: Timings, denominator: Timings) -> None:
    """report[key] (wall) and report[key + '_cpu'] (process CPU time): medians of per-round ratios, with spreads."""
    wall, cpu = per_round_ratio(numerator.wall, denominator.wall), per_round_ratio(numerator.cpu, denominator.cpu)
    report[key], report[f"{key}_spread"] = wall.median, wall.as_dict()
    report[f"{key}_cpu"], report[f"{key}_cpu_spread"] = cpu.median, cpu.as_dict()


def real_throughput(step: RealStep, timings: Timings, flops_per_token: int) -> dict:
    """One real step's contents and timings -> throughput() over its slots, plus its real-token figures."""
    figures = throughput(timings, step.slots, flops_per_token)
    return {**figures, "tokens_per_step": step.slots, "real_tokens_per_step": step.real_tokens,
            "samples_per_step": step.samples, "padding_fraction": step.padding_fraction,
            "real_tokens_per_s": step.real_tokens / figures["step_s"]["median"]}


def packing_figures(steps: dict[str, RealStep], timings: dict[str, Timings], flops_per_token: int,
                    corpus: str) -> dict:
    """The "packed" and "unpacked" real steps' figures and packed_vs_unpacked (module docstring)."""
    packing = {"corpus": corpus, **{name: real_throughput(steps[name], timings[name], flops_per_token)
                                    for name in ("packed", "unpacked")}}
    for key, clock in (("packed_vs_unpacked", "wall"), ("packed_vs_unpacked_cpu", "cpu")):
        rates = {name: [steps[name].real_tokens / seconds for seconds in getattr(timings[name], clock)]
                 for name in ("packed", "unpacked")}  # real tokens/s of each round's step
        ratio = per_round_ratio(rates["packed"], rates["unpacked"])
        packing[key], packing[f"{key}_spread"] = ratio.median, ratio.as_dict()
    return packing


class DensePair(NamedTuple):
    """The rounds of a mixture-of-experts engine and its dense counterpart's engine, and the counterpart's facts."""
    engine: Timings
    dense: Timings
    flops_per_token: int
    causal_flops_per_token: int
    facts: dict
    """trainer.bench.dense_counterpart.counterpart_facts"""


def build_report(pairs: dict[str, tuple[Timings, Timings]], tokens_per_step: int, flops_per_token: int,
                 peak: Optional[float], peak_memory_bytes: int, context: dict, pipeline: Optional[dict],
                 engine_alone: Optional[Timings] = None, packing: Optional[dict] = None,
                 causal_flops_per_token: Optional[int] = None, dense: Optional[DensePair] = None) -> dict:
    """pairs: contender ("bare_loop", "hf_gpt2") -> (the engine's timings, the contender's timings) of the rounds
    the two ran in together; engine_alone: the engine's timings when there is no other contender. The
    engine's throughput is taken over all its steps. packing: packing_figures() of a run with a corpus.
    causal_flops_per_token: the same count with causal attention counted half (default: flops_per_token).
    dense: a mixture-of-experts engine's rounds with its dense counterpart."""
    engine_times = sum((engine for engine, _ in pairs.values()), engine_alone or Timings([], [], []))
    if dense is not None:
        engine_times = engine_times + dense.engine
    engine = throughput(engine_times, tokens_per_step, flops_per_token)
    report = {**context, "flop_formula": FLOP_FORMULA, "flops_per_token": flops_per_token,
              "tokens_per_step": tokens_per_step,
              "tokens_per_s": engine["tokens_per_s"], "tflops": engine["tflops"],
              "peak_tflops": peak, "mfu": None if peak is None else engine["tflops"] / peak,
              **mfu_both_ways(engine["tokens_per_s"], causal_flops_per_token or flops_per_token, peak),
              "peak_memory_bytes": peak_memory_bytes, "engine": engine,
              "vs_bare_loop": None, "vs_hf_gpt2": None, "pipeline": pipeline, "packing": packing}
    for name, (engine_rounds, timings) in pairs.items():
        report[name] = {**throughput(timings, tokens_per_step, flops_per_token),
                        "engine_seconds": engine_rounds.wall, "engine_cpu_seconds": engine_rounds.cpu}
    if "bare_loop" in pairs:
        _ratios(report, "vs_bare_loop", *pairs["bare_loop"])
    if "hf_gpt2" in pairs:
        engine_rounds, gpt2 = pairs["hf_gpt2"]
        _ratios(report, "vs_hf_gpt2", gpt2, engine_rounds)
    report["dense"] = report["moe_vs_dense"] = None
    if dense is not None:
        figures = throughput(dense.dense, tokens_per_step, dense.flops_per_token)
        report["dense"] = {**figures, "flops_per_token": dense.flops_per_token,
                           "mfu": None if peak is None else figures["tflops"] / peak,
                           **mfu_both_ways(figures["tokens_per_s"], dense.causal_flops_per_token, peak),
                           "engine_seconds": dense.engine.wall, "engine_cpu_seconds": dense.engine.cpu,
                           "counterpart": dense.facts}
        _ratios(report, "moe_vs_dense", dense.dense, dense.engine)
    return report


def mfu_both_ways(tokens_per_s: float, causal_flops_per_token: int, peak: Optional[float]) -> dict:
    """The causal-convention figures beside the full-square ones (module docstring)."""
    tflops = tokens_per_s * causal_flops_per_token / 1e12
    return {"flops_per_token_causal": causal_flops_per_token, "tflops_causal": tflops,
            "mfu_causal": None if peak is None else tflops / peak}


def mfu_line(report: dict, label: str = "MFU") -> str:
    if report["mfu"] is None:
        return f"{label:<24} n/a (pass --peak-tflops)"
    return (f"{label:<24} {100 * report['mfu']:.1f}% attention full s^2, {100 * report['mfu_causal']:.1f}% causal "
            f"half (Megatron), of {report['peak_tflops']} TFLOP/s")


def _dense_lines(report: dict) -> list[str]:
    dense = report["dense"]
    if dense is None:
        return []
    facts = dense["counterpart"]
    return [f"{'dense counterpart':<24} ffn {facts['dense_ffn_hidden_size']} in every block: "
            f"{facts['dense_parameters']:,} parameters against the MoE's {facts['moe_active_parameters']:,} active "
            f"({facts['moe_total_parameters']:,} total; difference {facts['active_difference']:+,})",
            mfu_line({**dense, "peak_tflops": report["peak_tflops"]}, "MFU dense counterpart"),
            _ratio_line(report, "moe_vs_dense", "MoE / dense tokens/s")]


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)


def _ratio_line(report: dict, key: str, label: str) -> str:
    if report[key] is None:
        return f"{label:<24} not measured"
    wall, cpu = report[f"{key}_spread"], report[f"{key}_cpu_spread"]
    return (f"{label:<24} {report[key]:.3f} wall (rounds {wall['min']:.3f}..{wall['max']:.3f}), "
            f"{report[key + '_cpu']:.3f} CPU time (rounds {cpu['min']:.3f}..{cpu['max']:.3f})")


def _packing_lines(packing: Optional[dict]) -> list[str]:
    if packing is None:
        return [f"{'real batches':<24} not run (no data.path)"]
    lines = [f"real batches of {packing['corpus']} (first optimizer step, the same engine):",
             f"{'data.packing':<24} {'step s (median, min..max)':<30} {'real tok/step':>13} {'samples':>8} "
             f"{'padding':>8} {'real tokens/s':>14}"]
    for name in ("packed", "unpacked"):
        entry = packing[name]
        step = entry["step_s"]
        lines.append(f"{name:<24} {step['median']:.4f} ({step['min']:.4f}..{step['max']:.4f}){'':<8} "
                     f"{entry['real_tokens_per_step']:>13} {entry['samples_per_step']:>8} "
                     f"{100 * entry['padding_fraction']:>7.1f}% {entry['real_tokens_per_s']:>14.0f}")
    return lines + [_ratio_line(packing, "packed_vs_unpacked", "packed/unpacked tok/s")]


def to_text(report: dict) -> str:
    """A human-readable summary of the report."""
    lines = [f"glm-bench  {report['config']}  on {report['device']}  ({report['precision']}, "
             f"{report['steps']} timed rounds per comparison after {report['warmup']} warm-up steps)",
             f"shape: {report['shape']}",
             f"FLOPs: {report['flop_formula']}",
             f"{'contender':<24} {'step s (median, min..max)':<30} {'tokens/s':>10} {'TFLOP/s':>9} {'faults/step':>12}"]
    for key, label in (("engine", "GLM, DeepSpeed engine"), ("bare_loop", "GLM, bare PyTorch loop"),
                       ("hf_gpt2", "HF GPT-2, plain loop"), ("dense", "dense, DeepSpeed engine")):
        if report.get(key) is not None:
            entry = report[key]
            step = entry["step_s"]
            faults = "n/a" if entry["page_faults_per_step"] is None else f"{entry['page_faults_per_step']:.0f}"
            lines.append(f"{label:<24} {step['median']:.4f} ({step['min']:.4f}..{step['max']:.4f}){'':<8} "
                         f"{entry['tokens_per_s']:>10.0f} {entry['tflops']:>9.4f} {faults:>12}")
    lines += [mfu_line(report),
              f"{'peak memory':<24} {report['peak_memory_bytes'] / 2 ** 20:.0f} MiB ({report['memory_note']})",
              _ratio_line(report, "vs_bare_loop", "engine / bare loop"),
              _ratio_line(report, "vs_hf_gpt2", "GLM / HF GPT-2 tokens/s")]
    lines += _dense_lines(report)
    lines += _packing_lines(report["packing"])
    pipeline = report["pipeline"]
    if pipeline is None or "skipped" in pipeline:
        lines.append(f"{'pipeline pp=2':<24} {'not run' if pipeline is None else 'skipped: ' + pipeline['skipped']}")
    else:
        lines.append(f"{'pipeline pp=2':<24} efficiency {pipeline['efficiency']:.3f} vs ideal m/(m+p-1) = "
                     f"{pipeline['ideal_efficiency']:.3f} (m={pipeline['micro_batches']}; step "
                     f"{pipeline['pipeline_step_s']['median']:.4f} s vs one stage "
                     f"{pipeline['single_stage_step_s']['median']:.4f} s)")
    return "\n".join(lines)
