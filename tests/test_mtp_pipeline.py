"""The MTP layer on the pipeline (trainer/engine/pipeline.py, trainer/model/mtp.py): configs/glm-4.5-debug.yaml,
shortened as tests/test_moe_parallel.py does, with its MTP layer on the last of 2 stages reproduces the single
process's losses (mtp_loss included) within 1e-5 and gradient norms within 1e-6 at every step, at pp = 2 (with
and without recomputation) and pp = 2 x ep = 2; the pp = 2 checkpoint reads back (glm-ckpt convert / export's
reader) under the same canonical names and values as the single process's, MTP tensors included, and resumes at
pp = 1 on the same curve (the routers' expert_bias restored). CPU, gloo, fp32 without ZeRO."""
import json

import pytest
import torch
from torch.testing import assert_close

from tests.distributed import run_distributed
from tests.test_model_mtp import _train  # trains; rank 0 writes metrics.jsonl to out_path
from tests.test_moe_parallel import BASE
from trainer.checkpoint.model_source import read_weights
from trainer.checkpoint.pipeline_files import layers_with_files
from trainer.config import load_config
from trainer.tools.preflight import preflight

STEPS = 4
MTP = ["model.mtp_layers=1", "train.save_interval=2"]
"""BASE (4 steps, 4 blocks: one dense, three MoE) with GLM-4.5's MTP layer (its block MoE too, loss weight 0.3),
saving at step 2 and 4."""
CURVES = ("loss", "mtp_loss", "grad_norm")


def _metrics(tmp_path, name: str, overrides: list[str], world_size: int = 1) -> list[dict]:
    config = preflight(load_config("configs/glm-4.5-debug.yaml",
                                   BASE + MTP + overrides + [f"train.run_dir={tmp_path / name}"]), world_size)
    run_distributed(_train, world_size, config, tmp_path / f"{name}.jsonl")
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


def _column(records: list[dict], key: str) -> torch.Tensor:
    return torch.tensor([record[key] for record in records], dtype=torch.float64)


def _assert_same_curves(records: list[dict], reference: list[dict]) -> None:
    assert len(records) == len(reference)
    for key in CURVES:
        assert_close(_column(records, key), _column(reference, key), rtol=1e-6 if key == "grad_norm" else 1e-5, atol=0,
                     msg=lambda message, key=key: f"{key}: {message}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """(metrics, run directory) of the single-process run."""
    root = tmp_path_factory.mktemp("mtp_pipeline")
    return _metrics(root, "single", []), root / "single"


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp_pp2")
    return _metrics(root, "pp2", ["parallel.pp=2"], world_size=2), root / "pp2"


def test_the_reference_trains_its_mtp_layer(single):
    records = single[0]
    assert len({record["loss"] for record in records}) == STEPS and records[-1]["loss"] < records[0]["loss"]
    assert all(record["mtp_loss"] > 0 for record in records)


def test_pp2_matches_the_single_process(single, pp2):
    _assert_same_curves(pp2[0], single[0])


def test_pp2_checkpoint_reads_back_as_the_single_process_one(single, pp2):
    """What glm-ckpt convert and export read: the same canonical names (the MTP layer's included) and weights."""
    config, ours = read_weights(pp2[1] / "checkpoints" / "global_step2", None)
    _, reference = read_weights(single[1] / "checkpoints" / "global_step2", None)
    assert config.mtp_layers == 1 and "mtp.layers.0.eh_proj.weight" in ours
    assert sorted(ours) == sorted(reference)
    for name in reference:
        assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6,
                     msg=lambda message, name=name: f"{name}: {message}")
    # the layer files: every piece with weights of its own (the MTP layer is global layer N + 3)
    n = config.num_layers
    assert layers_with_files(config) == [*range(n + 2), n + 3, n + 4]
    assert (pp2[1] / "checkpoints" / "global_step2" / f"layer_{n + 3:02d}-model_00-model_states.pt").is_file()


def test_a_pp2_run_resumes_at_pp1_on_the_same_curve(single, tmp_path):
    first = _metrics(tmp_path, "resume", ["parallel.pp=2", "train.steps=2"], world_size=2)
    second = _metrics(tmp_path, "resume", ["train.resume=true"])
    _assert_same_curves(first + second[-2:], single[0])


@pytest.mark.parametrize("name, overrides, world_size", [
    # recomputation, as configs/glm-4.5.yaml trains: on the pipeline the MTP layer is a recomputed layer too
    ("pp2_recompute", ["parallel.pp=2", "parallel.recompute_interval=1"], 2),
    # MoE layers on both stages, the MTP layer's MoE block on the last one, its experts split over ep
    ("pp2_ep2", ["parallel.pp=2", "parallel.ep=2"], 4),
])
def test_other_pipeline_layouts_match_the_single_process(single, tmp_path, name, overrides, world_size):
    _assert_same_curves(_metrics(tmp_path, name, overrides, world_size), single[0])
