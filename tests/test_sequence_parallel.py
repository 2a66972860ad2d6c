"""Megatron sequence parallelism (trainer/parallel/sequence.py, parallel.sequence_parallel): the verbs on 2 gloo
ranks against the single-process math, the config's refusals, and training at tp=2 with sequence parallelism
against the single process (losses within 1e-5, gradient norms within 1e-6, every step), whose checkpoint then
decodes without it; the mixture-of-experts model (glm-4.5-debug, MTP on) likewise, routing as plain tp=2 does."""
import json

import pytest
import torch
from torch import nn

from tests.distributed import run_distributed
from tests.test_engine_parity import _grad_norms, _losses
from trainer.config import load_config
from trainer.errors import ConfigError
from trainer.parallel.comm import world_group
from trainer.parallel.sequence import (gather_from_sequence, linear_gathered_sequence, reduce_scatter_to_sequence,
                                       scatter_to_sequence, sum_grad_over_tp_)
from trainer.tools.preflight import preflight

SHAPE = (2, 6, 3)  # [b, s, h]; rank r holds tokens [3 r, 3 r + 3)


def _tensors(count: int) -> list[torch.Tensor]:
    """The same deterministic tensors on every rank."""
    generator = torch.Generator().manual_seed(1234)
    return [torch.randn(SHAPE, generator=generator) for _ in range(count)]


def _tokens(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[:, 3 * rank:3 * rank + 3]


def _check_scatter(rank: int, group) -> None:
    x, w = _tensors(2)
    x = x.clone().requires_grad_()
    y = scatter_to_sequence(x, group)  # [b, s/2, h]
    torch.testing.assert_close(y, _tokens(x.detach(), rank))
    (y * _tokens(w, rank)).sum().backward()
    torch.testing.assert_close(x.grad, w)  # backward: all-gather of both ranks' tokens


def _check_gather(rank: int, group) -> None:
    x, w = _tensors(2)
    x_r = _tokens(x, rank).clone().requires_grad_()
    y = gather_from_sequence(x_r, group)
    torch.testing.assert_close(y, x)
    (y * w).sum().backward()  # the same gradient on both ranks
    torch.testing.assert_close(x_r.grad, _tokens(w, rank))  # backward: this rank's tokens


def _check_linear_gathered(rank: int, group) -> None:
    """A column-parallel product on this rank's tokens: rank r's output columns for every token, the input's
    gradient summed over both ranks' columns, the weight's gradient over every token."""
    x, = _tensors(1)
    generator = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(4, SHAPE[-1], generator=generator), torch.randn(4, generator=generator)
    w_out = torch.randn(SHAPE[0], SHAPE[1], 4, generator=generator)
    full_x = x.clone().requires_grad_()
    full_w, full_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    (torch.nn.functional.linear(full_x, full_w, full_b) * w_out).sum().backward()  # the single-process reference
    columns = slice(2 * rank, 2 * rank + 2)  # [out/p] of out = 4
    x_r = _tokens(x, rank).clone().requires_grad_()
    w_r, b_r = weight[columns].clone().requires_grad_(), bias[columns].clone().requires_grad_()
    y = linear_gathered_sequence(x_r, w_r, b_r, group)  # [b, s, out/p]
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias)[..., columns])
    (y * w_out[..., columns]).sum().backward()
    torch.testing.assert_close(x_r.grad, _tokens(full_x.grad, rank))  # reduce-scattered over the ranks' columns
    torch.testing.assert_close(w_r.grad, full_w.grad[columns])
    torch.testing.assert_close(b_r.grad, full_b.grad[columns])


def _check_reduce_scatter(rank: int, group) -> None:
    x0, x1, w = _tensors(3)
    x = (x0, x1)[rank].clone().requires_grad_()
    y = reduce_scatter_to_sequence(x, group)
    torch.testing.assert_close(y, _tokens(x0 + x1, rank))
    (y * _tokens(w, rank)).sum().backward()
    torch.testing.assert_close(x.grad, w)  # backward: all-gather
    torch.testing.assert_close(x.detach(), (x0, x1)[rank])  # the input is not reduced in place


def _check_parameter_gradient_sum(rank: int, group) -> None:
    """A gain used on this rank's tokens only: its gradient summed over the ranks is the whole row's."""
    x, w = _tensors(2)
    gain = sum_grad_over_tp_(nn.Parameter(torch.ones(SHAPE[-1])), group)
    (_tokens(x, rank) * gain * _tokens(w, rank)).sum().backward()
    torch.testing.assert_close(gain.grad, (x * w).sum(dim=(0, 1)))
    assert gain.sequence_parallel


def _verbs(rank, world_size):
    group = world_group()
    for check in (_check_scatter, _check_gather, _check_linear_gathered, _check_reduce_scatter,
                  _check_parameter_gradient_sum):
        check(rank, group)


def test_sequence_verbs_forward_and_backward_on_two_ranks():
    run_distributed(_verbs, 2)


def test_without_a_group_every_verb_is_the_identity():
    x = torch.randn(SHAPE)
    for verb in (scatter_to_sequence, gather_from_sequence, reduce_scatter_to_sequence):
        assert verb(x, None) is x


@pytest.mark.parametrize("overrides, message", [
    (["parallel.sequence_parallel=true"], "needs tensor parallelism"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "data.seq_length=127"],
     "data.seq_length=127 is not divisible by parallel.tp=2"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "train.eval_interval=2", "data.valid_fraction=0.1",
      "train.eval_tasks=[lambada]"], "glm-eval --harness"),
])
def test_config_refuses_what_sequence_parallelism_cannot_run(overrides, message):
    config = load_config("configs/glm-debug.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        config.validate()


SHORT = ["train.steps=4", "optim.decay_steps=2"]
"""4 steps, validated at step 4 (the parity BASE's eval_interval)."""
SP = ["parallel.tp=2", "parallel.sequence_parallel=true"]


@pytest.mark.parametrize("config_path, extra", [("configs/glm-debug.yaml", []),
                                                ("configs/glm-4-debug.yaml", ["parallel.recompute_interval=1"])],
                         ids=["glm_debug_blank_infilling", "glm_4_debug_causal_recomputed"])
def test_tp2_with_sequence_parallelism_matches_single_process(tmp_path, config_path, extra):
    """glm-debug: packed rows in its three blank-infilling modes, learned 2D positions, LayerNorm, tied output;
    glm-4-debug: packed causal rows, rotary, RMSNorm, SwiGLU, grouped-query attention, untied output, and every
    block recomputed in backward (the recomputed forward gathers the sequence again)."""
    single = _losses(tmp_path, "single", SHORT, config_path=config_path)
    sp = _losses(tmp_path, "sp", SHORT + SP + extra + ["train.save_interval=4"], world_size=2,
                 config_path=config_path)
    assert len(sp) == 5  # 4 training losses, then the validation loss at step 4
    torch.testing.assert_close(torch.tensor(sp), torch.tensor(single), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(_grad_norms(tmp_path, "sp"), dtype=torch.float64),
                               torch.tensor(_grad_norms(tmp_path, "single"), dtype=torch.float64), rtol=1e-6, atol=0)
    if config_path.endswith("glm-debug.yaml"):
        _decode_without_sequence_parallelism(tmp_path / "sp" / "checkpoints" / "global_step4")


def _decode_without_sequence_parallelism(checkpoint):
    """glm-generate and glm-eval read a checkpoint of a sequence-parallel run and decode it on one process."""
    from trainer.tools.evaluate import main as evaluate
    from trainer.tools.generate import main as generate

    assert generate([str(checkpoint), "--text", "the cat [MASK] on the mat.", "--max-new-tokens", "3"]) == 0
    task = checkpoint.parent / "task.jsonl"
    task.write_text('{"text": "the cat [MASK] on the mat.", "label": "yes"}\n'
                    '{"text": "the dog [MASK] in the park.", "label": "no"}\n')
    assert evaluate([str(checkpoint), "--data", str(task), "--verbalizers", '{"yes": " sat", "no": " ran"}']) == 0


@pytest.mark.parametrize("name, overrides", [("tp2_pp2", ["parallel.pp=2"]), ("tp2_dp2_zero2", ["optim.zero_stage=2"])])
def test_four_process_layouts_with_sequence_parallelism_match_single_process(tmp_path, name, overrides):
    """The pipeline engine sends each tensor rank's own tokens between its stages; ZeRO-2 reduces and partitions
    the gradients in backward hooks of its own, after the norms' gradients were summed over tp."""
    single = _losses(tmp_path, "single", SHORT)
    sp = _losses(tmp_path, name, SHORT + SP + overrides, world_size=4)
    torch.testing.assert_close(torch.tensor(sp), torch.tensor(single), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(_grad_norms(tmp_path, name), dtype=torch.float64),
                               torch.tensor(_grad_norms(tmp_path, "single"), dtype=torch.float64), rtol=1e-6, atol=0)


def test_memory_model_divides_the_sequence_parallel_activations_by_tp():
    """The norms' and column-parallel layers' inputs (4 e s b h) and the norms' statistics (16 s b) are this rank's
    s/tp tokens; with hidden dropout its two masks too; the rest of a block's activations do not change."""
    from launch.memory import Workload, block_activation_bytes

    config = load_config("configs/glm-debug.yaml", ["data.seq_length=128"])
    work = Workload.from_config(config)
    e, s, h = work.activation_bytes, 128, config.model.hidden_size
    for tp in (2, 4):
        saved = block_activation_bytes(work, tp, 1) - block_activation_bytes(work, tp, 1, sequence_parallel=True)
        assert saved == 4 * e * s * h - 4 * e * s * h // tp + 16 * s - 16 * s // tp
    dropout = Workload.from_config(load_config("configs/glm-debug.yaml", ["model.hidden_dropout=0.1"]))
    saved = block_activation_bytes(dropout, 2, 1) - block_activation_bytes(dropout, 2, 1, sequence_parallel=True)
    assert saved == (4 * e * s * h + 16 * s + 2 * s * h * dropout.dropout_mask_bytes) // 2


def test_the_planner_turns_sequence_parallelism_on_with_tp_unless_fixed_off():
    from launch.devices import Cluster, HostMemory
    from launch.memory import Workload
    from launch.planner import Fixed, plan_layout, sequence_parallel

    config = load_config("configs/glm-4-9b.yaml", ["data.seq_length=32768", "model.max_sequence_length=32768"])
    cluster = Cluster((("node0", 8),), 80 * 10 ** 9, "cuda", "hostfile")
    host = HostMemory(2000 * 10 ** 9, "--host-memory")
    plan = plan_layout(config, cluster, host)
    assert plan.layout.tp > 1 and plan.layout.sequence_parallel
    assert "parallel.sequence_parallel=true" in plan.overrides() and plan.to_dict()["sequence_parallel"]
    off = plan_layout(config, cluster, host, Fixed(tp=plan.layout.tp, sequence_parallel=False))
    assert not off.layout.sequence_parallel and off.peak.activations > plan.peak.activations
    work = Workload.from_config(config)
    assert not sequence_parallel(work, Fixed(), 1)  # nothing to split over
    assert not sequence_parallel(Workload.from_config(load_config("configs/glm-4-9b.yaml", ["data.seq_length=1001"])),
                                 Fixed(), 2)  # not divisible


# ---- mixture of experts (configs/glm-4.5-debug.yaml, shortened as in tests/test_moe_parallel.py) --------------

def _train_moe(rank, world_size, config, out_path):
    """Train; rank 0 writes the losses, each step's metrics and every router's expert_bias after the last step."""
    from trainer.engine.loop import train

    torch.set_num_threads(1)
    result = train(config)
    if rank == 0:
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        biases = {name: buffer.tolist() for name, buffer in result.engine.module.named_buffers()
                  if name.endswith("expert_bias")}
        out_path.write_text(json.dumps({"losses": result.losses, "records": records, "biases": biases}))


def _moe_run(tmp_path, name, overrides, world_size=1) -> dict:
    """configs/glm-4.5-debug.yaml shortened as tests/test_moe_parallel.py's BASE (4 steps, rows of 64 slots)."""
    from tests.test_moe_parallel import BASE as MOE_BASE

    out = tmp_path / f"{name}.json"
    overrides = MOE_BASE + overrides + [f"train.run_dir={tmp_path / name}"]
    run_distributed(_train_moe, world_size, preflight(load_config("configs/glm-4.5-debug.yaml", overrides), world_size),
                    out)
    return json.loads(out.read_text())


def _column(run: dict, key: str) -> torch.Tensor:
    return torch.tensor([record[key] for record in run["records"]], dtype=torch.float64)


MTP = ["model.mtp_layers=1"]


@pytest.fixture(scope="module")
def moe_single(tmp_path_factory) -> dict:
    """glm-4.5-debug with its MTP layer (a MoE block too), auxiliary and z-losses on, in one process."""
    return _moe_run(tmp_path_factory.mktemp("moe"), "single", MTP)


def _assert_matches_single(run: dict, single: dict) -> None:
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(_column(run, "mtp_loss"), _column(single, "mtp_loss"), rtol=1e-5, atol=0)
    torch.testing.assert_close(_column(run, "grad_norm"), _column(single, "grad_norm"), rtol=1e-6, atol=0)
    assert run["biases"] == single["biases"] and any(any(bias) for bias in single["biases"].values())


def test_moe_at_tp2_with_sequence_parallelism_matches_single_process_and_routes_as_tp2(moe_single, tmp_path):
    """The router and the experts of GLMMoE see the whole row, all-gathered over the tensor ranks, so the losses
    (main and MTP), gradient norms and expert biases are the single process's, and the routing (each layer's loads,
    the auxiliary and z-losses, the load imbalance) is exactly that of tp=2 without sequence parallelism."""
    tp2 = _moe_run(tmp_path, "tp2", MTP + ["parallel.tp=2"], world_size=2)
    sp = _moe_run(tmp_path, "sp", MTP + SP, world_size=2)
    _assert_matches_single(sp, moe_single)
    for key in ("moe_aux_loss", "moe_z_loss", "moe_load_imbalance"):
        torch.testing.assert_close(_column(sp, key), _column(tp2, key), rtol=1e-6, atol=0)
    assert sp["biases"] == tp2["biases"]


def test_moe_at_tp2_ep2_with_sequence_parallelism_matches_single_process(moe_single, tmp_path):
    """4 processes: the gathered row's tokens go to their experts' ep rank by the all-to-all (each of the two ep
    ranks holds 4 experts, each split over the two tensor ranks)."""
    _assert_matches_single(_moe_run(tmp_path, "sp_ep2", MTP + SP + ["parallel.ep=2"], world_size=4), moe_single)
