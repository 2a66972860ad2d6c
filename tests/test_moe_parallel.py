"""Expert parallelism end to end (configs/glm-4.5-debug.yaml, shortened): ep = 2, tp = 2 x ep = 2 and pp = 2 x ep = 2
reproduce the single process's losses within 1e-5 and gradient norms within 1e-6 at every step, and a run saved at
ep = 2 resumes at ep = 1 on the same curve (Adam moments included). CPU, gloo, fp32 without ZeRO."""
import json

import pytest
import torch

from tests.distributed import run_distributed
from trainer.checkpoint.expert_files import checkpoint_ep, expert_file, read_experts
from trainer.checkpoint.layout import rule_for
from trainer.checkpoint.model_source import read_weights
from trainer.checkpoint.pipeline_files import canonical_name
from trainer.config import load_config
from trainer.data.corpus import embedded_paragraphs_corpus
from trainer.tools.preflight import preflight

STEPS = 4
# 4 blocks: the first dense, three MoE layers of 8 experts (top-2, one shared expert); at pp = 2 MoE layers sit on
# both stages. Rows of 64 slots, 4 micro-batches of 2 per step at dp = 1.
BASE = ["model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_key_value_heads=2",
        "model.max_sequence_length=64", "data.seq_length=64", f"data.path={embedded_paragraphs_corpus()}",
        "parallel.micro_batch_size=2", "parallel.global_batch_size=8", f"train.steps={STEPS}",
        "optim.warmup_steps=1", "optim.decay_steps=3", "optim.zero_stage=0", "train.save_interval=0",
        "train.eval_interval=0", "model.mtp_layers=0"]


def _train(rank, world_size, config, out_path):
    from trainer.engine.loop import train

    torch.set_num_threads(1)
    result = train(config)
    if rank == 0:
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        out_path.write_text(json.dumps({"losses": result.losses, "norms": [r["grad_norm"] for r in records]}))


def _run(tmp_path, name, overrides, world_size=1) -> dict:
    out = tmp_path / f"{name}.json"
    config = preflight(load_config("configs/glm-4.5-debug.yaml", BASE + overrides + [f"train.run_dir={tmp_path / name}"]),
                       world_size)
    run_distributed(_train, world_size, config, out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("moe_ref"), "single", [])


def test_the_reference_trains(reference):
    losses = reference["losses"]
    assert len(set(losses)) == STEPS and losses[-1] < losses[0]


@pytest.mark.parametrize("name, overrides, world_size", [
    ("ep2", ["parallel.ep=2"], 2),
    ("tp2_ep2", ["parallel.tp=2", "parallel.ep=2"], 4),
    ("pp2_ep2", ["parallel.pp=2", "parallel.ep=2"], 4),
])
def test_expert_parallel_layouts_match_single_process(reference, tmp_path, name, overrides, world_size):
    run = _run(tmp_path, name, overrides, world_size)
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(run["norms"], dtype=torch.float64),
                               torch.tensor(reference["norms"], dtype=torch.float64), rtol=1e-6, atol=0)


def test_a_run_saved_at_ep2_resumes_at_ep1_on_the_same_curve(reference, tmp_path):
    first = _run(tmp_path, "resume", ["parallel.ep=2", "train.steps=2", "train.save_interval=2"], 2)
    second = _run(tmp_path, "resume", ["train.resume=true"], 2)  # dp = 2, every expert on every rank
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]), torch.tensor(reference["losses"]),
                               rtol=1e-5, atol=0)


def test_a_run_saved_at_tp2_ep2_resumes_at_ep4_and_reads_back_all_experts(reference, tmp_path):
    first = _run(tmp_path, "reshard", ["parallel.tp=2", "parallel.ep=2", "train.steps=2", "train.save_interval=2"], 4)
    _, weights = read_weights(tmp_path / "reshard" / "checkpoints", None)  # what convert and export read
    assert weights["transformer.layers.1.mlp.experts.down_weight"].shape == (8, 32, 32)  # all experts, full width
    second = _run(tmp_path, "reshard", ["parallel.ep=4", "train.resume=true"], 4)  # dp = 4: 2 experts a rank
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]), torch.tensor(reference["losses"]),
                               rtol=1e-5, atol=0)


def test_a_pipeline_run_saved_at_pp2_ep2_resumes_in_one_process(reference, tmp_path):
    """The pipeline engine's layer files hold data rank 0's experts only; the expert files (named by pipeline layer)
    complete them, Adam moments included."""
    first = _run(tmp_path, "pipeline", ["parallel.pp=2", "parallel.ep=2", "train.steps=2", "train.save_interval=2"], 4)
    second = _run(tmp_path, "pipeline", ["train.resume=true"], 1)
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]), torch.tensor(reference["losses"]),
                               rtol=1e-5, atol=0)


def test_expert_files_of_tp2_ep2_merge_into_all_experts(tmp_path):
    """Each (ep, tp) rank's file holds rule.shard of its block of experts; read_experts gives back the canonical
    tensors of all 8 experts, weights and moments."""
    model = load_config("configs/glm-4.5-debug.yaml", BASE + ["model.vocab_size=64"]).model
    names = [f"transformer.layers.1.mlp.experts.{w}" for w in ("gate_up_weight", "down_weight")]
    generator = torch.Generator().manual_seed(3)
    canonical = {key: {name: torch.randn(8, 64, 32, generator=generator) if "gate_up" in name
                       else torch.randn(8, 32, 32, generator=generator) for name in names}
                 for key in ("fp32", "exp_avg", "exp_avg_sq")}
    for ep_rank in range(2):
        for tp_rank in range(2):
            tensors = {name: {key: rule_for(name, model).shard(canonical[key][name][4 * ep_rank:4 * ep_rank + 4],
                                                                tp_rank, 2) for key in canonical} for name in names}
            torch.save({"ep": 2, "step": 5, "tensors": tensors}, expert_file(tmp_path, ep_rank, tp_rank))
    assert checkpoint_ep(tmp_path) == 2
    merged, step = read_experts(tmp_path, model, tp=2, pp=1, canonical_name=canonical_name)
    assert step == 5
    for key in canonical:
        for name in names:
            torch.testing.assert_close(merged[key][name], canonical[key][name], rtol=0, atol=0)
