"""glm-bench: the JSON report of a tiny run (fields, and every figure recomputed from the measured step
times), the real packed / unpacked batches of a corpus (their tokens and padding against the rows), the
synthetic batch format, the ratio arithmetic and the CLI's errors. No speed is asserted."""
import dataclasses
import json
import statistics
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch.testing import assert_close

from tests.distributed import run_distributed
from tests.glm_processes import REPO, TINY, _env
from trainer.bench.batches import synthetic_step
from trainer.bench.report import build_report, to_text
from trainer.bench.timing import Timings, round_orders, round_robin
from trainer.config import load_config
from trainer.data.corpus import embedded_paragraphs_corpus
from trainer.data.packing import build_sequences
from trainer.engine.flops import PEAK_TFLOPS, peak_tflops, train_flops_per_token
from trainer.errors import ConfigError
from trainer.model.config import ModelConfig

STEPS = 3
CONFIG = REPO / "configs" / "glm-debug.yaml"


def bench(*args: str, overrides: tuple[str, ...] = ("model.vocab_size=300",), config=CONFIG) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trainer.bench.cli", "--config", str(config)]
    for item in TINY + list(overrides):
        command += ["--set", item]
    return subprocess.run(command + list(args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def report() -> dict:
    result = bench("--steps", str(STEPS), "--warmup", "1", "--json", "--peak-tflops", "0.5",
                   "--pipeline-micro-batches", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_json_has_the_issue_fields_and_the_shape(report):
    for key in ("tokens_per_s", "tflops", "mfu", "peak_memory_bytes", "vs_bare_loop", "vs_hf_gpt2"):
        assert isinstance(report[key], (int, float)) and report[key] > 0, key
    assert report["shape"] == {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_size": 128,
                               "seq_length": 64, "padded_vocab_size": 384, "micro_batch_size": 2, "grad_accum": 2,
                               "recompute_interval": 0}
    assert "4 s q" in report["flop_formula"]
    for name in ("engine", "bare_loop", "hf_gpt2"):  # counted per step, as a median over the rounds
        assert isinstance(report[name]["page_faults_per_step"], (int, float)) and report[name]["page_faults_per_step"] >= 0


def test_figures_are_computed_from_the_measured_step_times(report):
    # each ratio pairs the contender with the engine steps of its own rounds
    pairs = {name: {"engine": report[name]["engine_seconds"], "other": report[name]["seconds"]}
             for name in ("bare_loop", "hf_gpt2")}
    cpu = {name: {"engine": report[name]["engine_cpu_seconds"], "other": report[name]["cpu_seconds"]}
           for name in ("bare_loop", "hf_gpt2")}
    all_engine = pairs["bare_loop"]["engine"] + pairs["hf_gpt2"]["engine"]
    assert report["engine"]["seconds"] == all_engine and len(all_engine) == 2 * STEPS
    assert all(len(s) == STEPS and min(s) > 0 for times in (pairs, cpu) for pair in times.values() for s in pair.values())
    tokens_per_step = 2 * 2 * 64
    assert report["tokens_per_step"] == tokens_per_step
    flops = train_flops_per_token(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300), 64)
    assert report["flops_per_token"] == flops
    assert_close(report["tokens_per_s"], tokens_per_step / statistics.median(all_engine))
    assert_close(report["tflops"], report["tokens_per_s"] * flops / 1e12)
    assert_close(report["mfu"], report["tflops"] / 0.5)
    causal = train_flops_per_token(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300),
                                   64, attention="causal")
    assert report["flops_per_token_causal"] == causal < flops  # Megatron's convention: attention's square halved
    assert_close(report["mfu_causal"], report["tokens_per_s"] * causal / 1e12 / 0.5)
    for times, suffix in ((pairs, ""), (cpu, "_cpu")):
        bare, gpt2 = times["bare_loop"], times["hf_gpt2"]
        assert_close(report["vs_bare_loop" + suffix],
                     statistics.median([e / b for e, b in zip(bare["engine"], bare["other"])]))
        assert_close(report["vs_hf_gpt2" + suffix],
                     statistics.median([g / e for g, e in zip(gpt2["other"], gpt2["engine"])]))


def test_pipeline_efficiency_is_measured_against_the_ideal(report):
    pipeline = report["pipeline"]
    assert pipeline["stages"] == 2 and pipeline["micro_batches"] == 2
    assert_close(pipeline["ideal_efficiency"], 2 / 3)
    single, staged = pipeline["single_stage_step_s"]["median"], pipeline["pipeline_step_s"]["median"]
    assert_close(pipeline["efficiency"], single / (2 * staged))


@pytest.fixture(scope="module")
def corpus_overrides() -> tuple[str, ...]:
    """The short-document corpus at s = 256; the vocabulary from its tokenizer."""
    return f"data.path={embedded_paragraphs_corpus()}", "data.seq_length=256", "model.max_sequence_length=256"


@pytest.fixture(scope="module")
def corpus_report(corpus_overrides) -> dict:
    result = bench("--steps", "1", "--warmup", "1", "--json", "--no-bare", "--no-hf", "--no-pipeline",
                   overrides=corpus_overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_real_batches_hold_the_first_step_of_the_rows(corpus_report, corpus_overrides):
    config = load_config(CONFIG, TINY + list(corpus_overrides))
    packing, rows_per_step, slots = corpus_report["packing"], 4, 4 * 256  # global batch 4 of micro-batches of 2
    assert packing["corpus"] == str(embedded_paragraphs_corpus())
    for name, packed in (("packed", True), ("unpacked", False)):
        rows = build_sequences(dataclasses.replace(config.data, packing=packed), config.train.seed)
        built = [rows[k] for k in range(rows_per_step)]
        real = sum(row["tokens"] for row in built)
        assert real == sum(rows.real_tokens(k) for k in range(rows_per_step))
        entry = packing[name]
        assert entry["real_tokens_per_step"] == real and entry["tokens_per_step"] == slots
        assert entry["samples_per_step"] == sum(len(row["starts"]) for row in built)
        assert_close(entry["padding_fraction"], 1 - real / slots)
        assert_close(entry["real_tokens_per_s"], real / statistics.median(entry["seconds"]))
    assert packing["packed"]["padding_fraction"] < packing["unpacked"]["padding_fraction"]
    assert packing["unpacked"]["samples_per_step"] == rows_per_step < packing["packed"]["samples_per_step"]


def test_packed_vs_unpacked_is_the_per_round_ratio_of_real_tokens_per_s(corpus_report):
    packing = corpus_report["packing"]
    for key, clock in (("packed_vs_unpacked", "seconds"), ("packed_vs_unpacked_cpu", "cpu_seconds")):
        rates = {name: [packing[name]["real_tokens_per_step"] / t for t in packing[name][clock]]
                 for name in ("packed", "unpacked")}
        assert len(rates["packed"]) == len(rates["unpacked"]) == 1
        assert_close(packing[key], statistics.median([p / u for p, u in zip(rates["packed"], rates["unpacked"])]))
    text = to_text(corpus_report)
    assert "packed/unpacked tok/s" in text and f"{packing['packed']['real_tokens_per_step']}" in text


def test_no_corpus_no_real_batches(report):
    assert report["packing"] is None and "not run (no data.path)" in to_text(report)


def test_report_ratios_pair_the_steps_of_one_round():
    pairs = {"bare_loop": (Timings([1.0, 4.0, 2.0], [2.0, 2.0, 2.0], [0, 10, 30]), Timings([1.0, 2.0, 2.0], [1.0, 1.0, 4.0])),
             "hf_gpt2": (Timings([2.0, 2.0, 2.0], [2.0, 2.0, 2.0]), Timings([6.0, 2.0, 2.0], [2.0, 2.0, 2.0]))}
    report = build_report(pairs, tokens_per_step=100, flops_per_token=10 ** 10, peak=None, peak_memory_bytes=1,
                          context={}, pipeline=None)
    assert report["tokens_per_s"] == 50.0 and report["tflops"] == 0.5 and report["mfu"] is None  # median of all 6
    assert report["engine"]["page_faults_per_step"] == 10 and report["bare_loop"]["page_faults_per_step"] is None
    assert report["vs_bare_loop"] == 1.0 and report["vs_bare_loop_spread"] == {"median": 1.0, "min": 1.0, "max": 2.0}
    assert report["vs_bare_loop_cpu"] == 2.0 and report["vs_bare_loop_cpu_spread"]["min"] == 0.5
    assert report["vs_hf_gpt2"] == 1.0 and report["vs_hf_gpt2_spread"]["max"] == 3.0
    alone = build_report({}, tokens_per_step=100, flops_per_token=1, peak=None, peak_memory_bytes=1, context={},
                         pipeline=None, engine_alone=Timings([4.0], [4.0]))
    assert alone["tokens_per_s"] == 25.0 and alone["vs_bare_loop"] is None and alone["vs_hf_gpt2"] is None


def test_round_robin_runs_every_order_in_turn():
    order = []
    times = round_robin({name: (lambda name=name: order.append(name)) for name in "abc"}, rounds=6)
    rounds = ["".join(order[i:i + 3]) for i in range(0, 18, 3)]
    assert sorted(rounds) == ["abc", "acb", "bac", "bca", "cab", "cba"]
    assert all(len(t.wall) == len(t.cpu) == 6 for t in times.values())
    # within the rounds each contender runs right after each other one equally often
    follows = Counter((order[i], order[i + 1]) for i in range(0, 18, 3) for i in (i, i + 1))
    assert set(follows.values()) == {2} and len(follows) == 6
    assert round_orders(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]


def test_synthetic_batch_is_a_gmask_sample_in_the_trainers_batch_format():
    """Rows of one [gMASK] sample, collated and normalised by the trainer's own code: the loss positions are the
    flat indices of Part B, the normaliser the step's loss tokens / grad_accum (trainer/engine/step_loss.py)."""
    batches = synthetic_step(2, 2, 8, 50)
    (input_ids, position_ids, block_position_ids, segments), (labels, loss_mask, normaliser, positions) = batches[0]
    assert segments[:, 0].eq(0).all() and segments[:, 1].eq(4).all() and input_ids.shape == labels.shape == (2, 8)
    assert all(t.dtype == torch.long for t in (input_ids, position_ids, block_position_ids, segments, labels, loss_mask))
    assert position_ids[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3]
    assert block_position_ids[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    assert loss_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert positions.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert float(normaliser) == 2 * 2 * 4 / 2  # 16 loss tokens in the step, 2 micro-batches
    assert int(input_ids.max()) < 50 and not torch.equal(input_ids, batches[1][0][0])


def _engine_and_bare_loop_losses(rank: int, world_size: int) -> None:
    from trainer.bench.runners import EngineRunner, bare_loop_runner
    from trainer.engine.distributed import init_distributed
    from trainer.parallel.random import model_parallel_seed
    from trainer.parallel.topology import Topology

    config = load_config(CONFIG, TINY + ["model.vocab_size=300"])
    init_distributed(1)
    topology = Topology.create(1, 1)
    model_parallel_seed(config.train.seed, topology)
    batches = synthetic_step(config.grad_accum_steps(1), 2, 64, 300, topology)
    engine, bare = EngineRunner(config, topology, 1, batches), bare_loop_runner(config, batches, "cpu")
    engine_losses = [engine.step() for _ in range(3)]
    bare_losses = [bare.step() for _ in range(3)]
    assert_close(torch.tensor(engine_losses), torch.tensor(bare_losses), atol=1e-5, rtol=0)


def test_engine_and_bare_loop_train_the_same_losses():
    """The two contenders whose ratio is the engine's overhead compute the same thing: the same model, loss (the
    trainer's normaliser and loss positions), optimizer, schedule and clipping give the same losses."""
    run_distributed(_engine_and_bare_loop_losses, 1)


def test_peak_tflops_by_number_or_known_device():
    assert peak_tflops(None, "bf16") is None
    assert peak_tflops("123.5", "fp32") == 123.5
    assert peak_tflops("H100-SXM", "bf16") == PEAK_TFLOPS[("h100-sxm", "bf16")]
    with pytest.raises(ConfigError, match="h100-sxm"):
        peak_tflops("tpu-v9", "bf16")


def test_cli_errors_are_one_line_and_exit_2():
    result = bench("--steps", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --steps, --warmup and --pipeline-micro-batches must be >= 1"


def test_device_check_refuses_an_out_it_cannot_write_before_measuring(tmp_path, capsys):
    from trainer.bench.cli import main

    taken = tmp_path / "file"
    taken.write_text("")
    assert main(["--device-check", "--smoke", "--out", str(taken)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {taken}: {taken} is a file; pass a directory that can be created"


def test_device_check_smoke_runs_every_part_on_the_cpu(tmp_path):
    """glm-bench --device-check --smoke: the accelerator check's code on the CPU at a tiny shape. Its figures
    are recomputed from its own timings; FlexAttention and SDPA agree; the profile split covers the step."""
    command = [sys.executable, "-m", "trainer.bench.cli", "--device-check", "--smoke", "--out", str(tmp_path),
               "--peak-tflops", "0.5"]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MFU full" in result.stdout and "profile of one step" in result.stdout
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["smoke"] and report["precision"] == "fp32" and report["peak_tflops"] == 0.5
    for name, (m, k, n) in zip(("qkv", "attention_out", "mlp_in", "mlp_out"),
                               ((512, 32, 96), (512, 32, 32), (512, 32, 128), (512, 128, 32))):
        gemm = report["gemm"][name]
        assert gemm["shape_mkn"] == [m, k, n]
        assert_close(gemm["tflops"], 2 * m * k * n / gemm["seconds"] / 1e12)
    for layout in ("unpacked", "packed"):
        entry = report["attention"][layout]
        assert entry["max_abs_difference"] < 1e-4 and entry["compared"] == ["output"]  # no FlexAttention CPU backward
        assert entry["flex_forward_s"] > 0 and entry["sdpa_forward_backward_s"] > 0
    assert [entry["micro_batch_size"] for entry in report["engine"]] == [1, 2]
    for entry in report["engine"]:
        assert_close(entry["tokens_per_s"], 2 * entry["micro_batch_size"] * 128 / entry["step_s"])
        assert entry["flops_per_token_causal"] < entry["flops_per_token"]
        for suffix in ("", "_causal"):
            assert_close(entry["tflops" + suffix], entry["tokens_per_s"] * entry["flops_per_token" + suffix] / 1e12)
            assert_close(entry["mfu" + suffix], entry["tflops" + suffix] / 0.5)
        assert entry["peak_memory_bytes"] > 0
    profile = report["profile"]
    busy = sum(seconds for name, seconds in profile["seconds"].items() if name != "idle")
    assert_close(profile["seconds"]["idle"], max(profile["step_s"] - busy, 0.0))
    assert profile["seconds"]["matmul"] > 0 and profile["seconds"]["attention"] > 0
    from launch.device_memory import main as device_memory  # the memory model beside the measured peaks

    assert device_memory([str(tmp_path / "device_check.json")]) == 0
    for entry in json.loads((tmp_path / "device_check.json").read_text())["engine"]:
        assert entry["memory_model_bytes"] > 0
        assert_close(entry["measured_over_model"], entry["peak_memory_bytes"] / entry["memory_model_bytes"])
