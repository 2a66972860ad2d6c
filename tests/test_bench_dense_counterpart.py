"""trainer/bench/dense_counterpart.py: the dense model glm-bench puts beside a mixture-of-experts one has the same
active parameters per token within the stated rounding (half a unit of MLP width, 3 h per block for SwiGLU), and
differs from it in the MLP alone; glm-bench on a tiny GLM-4.5 reports both engines' throughput and their ratio
from its own step times. No speed is asserted."""
import dataclasses
import json
import statistics

import pytest
from torch.testing import assert_close

from tests.glm_processes import REPO, TINY
from tests.test_bench import bench
from trainer.bench.dense_counterpart import dense_counterpart, dense_width
from trainer.bench.report import to_text
from trainer.config import load_config
from trainer.engine.flops import train_flops_per_token
from trainer.model import GLMModel

MOE_CONFIGS = ("glm-4.5-debug.yaml", "glm-4.5-air.yaml", "glm-4.5.yaml")


@pytest.mark.parametrize("name", MOE_CONFIGS)
@pytest.mark.parametrize("mtp_layers", (0, 1))
def test_dense_counterpart_has_the_active_parameters_within_the_rounding(name, mtp_layers):
    config = load_config(REPO / "configs" / name, ["model.vocab_size=151552", f"model.mtp_layers={mtp_layers}"])
    moe, dense = config.model, dense_counterpart(config).model
    blocks = moe.num_layers + moe.mtp_layers
    one_unit = 3 * moe.hidden_size * blocks  # A(f + 1) - A(f): SwiGLU without biases, gate, up and down
    assert abs(dense.active_parameters() - moe.active_parameters()) <= one_unit / 2
    assert dense.num_parameters() == dense.active_parameters() and dense.moe_num_experts == 0
    assert dense.ffn_size == dense_width(moe)
    changed = {f.name for f in dataclasses.fields(moe) if getattr(moe, f.name) != getattr(dense, f.name)}
    assert changed <= {"moe_num_experts", "moe_first_dense_layers", "ffn_hidden_size"}
    dense.validate(1)


def test_dense_counterpart_module_counts_the_closed_form():
    # without the MTP layer the debug MoE's counterpart matches its active parameters exactly (residual 0)
    config = load_config(REPO / "configs" / "glm-4.5-debug.yaml", ["model.vocab_size=4096", "model.mtp_layers=0"])
    dense = dense_counterpart(config).model
    model = GLMModel(dense)
    assert sum(p.numel() for p in model.parameters()) == dense.num_parameters() == config.model.active_parameters()


def test_a_dense_config_has_no_counterpart():
    with pytest.raises(ValueError, match="moe_num_experts"):
        dense_counterpart(load_config(REPO / "configs" / "glm-debug.yaml", ["model.vocab_size=300"]))


def test_glm_bench_reports_the_moe_step_against_its_dense_counterpart():
    """glm-bench on a tiny GLM-4.5: the MoE engine and the dense one take turns; every figure is recomputed from
    the report's step times and the two models' FLOPs per token (active parameters)."""
    overrides = ("model.vocab_size=300",)
    result = bench("--steps", "2", "--warmup", "1", "--json", "--no-bare", "--no-hf", "--no-pipeline",
                   "--peak-tflops", "0.5", overrides=overrides, config=REPO / "configs" / "glm-4.5-debug.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    config = load_config(REPO / "configs" / "glm-4.5-debug.yaml", TINY + list(overrides))
    dense_model = dense_counterpart(config).model
    dense, facts = report["dense"], report["dense"]["counterpart"]
    assert facts["dense_ffn_hidden_size"] == dense_width(config.model)
    assert facts["moe_active_parameters"] == config.model.active_parameters()
    assert facts["active_difference"] == dense_model.active_parameters() - config.model.active_parameters()
    tokens_per_step = 2 * 2 * 64
    assert report["flops_per_token"] == train_flops_per_token(config.model, 64)  # the MoE's active FLOPs
    assert dense["flops_per_token"] == train_flops_per_token(dense_model, 64)
    assert report["engine"]["seconds"] == dense["engine_seconds"] and len(dense["seconds"]) == 2
    assert_close(dense["tokens_per_s"], tokens_per_step / statistics.median(dense["seconds"]))
    assert_close(dense["mfu"], dense["tokens_per_s"] * dense["flops_per_token"] / 1e12 / 0.5)
    assert_close(report["mfu"], report["tokens_per_s"] * report["flops_per_token"] / 1e12 / 0.5)
    for clock, suffix in (("seconds", ""), ("cpu_seconds", "_cpu")):
        rounds = zip(dense[clock], dense[f"engine_{clock}"])
        assert_close(report["moe_vs_dense" + suffix], statistics.median([d / e for d, e in rounds]))
    text = to_text(report)
    assert "MoE / dense tokens/s" in text and f"ffn {facts['dense_ffn_hidden_size']} in every block" in text
