"""GLM-4.5's mixture-of-experts MLP (trainer/model/moe.py, trainer/parallel/experts.py): the router's choice and
weights, the grouped experts against a per-token reference, tensor parallelism against one process, the
auxiliary losses' gradients, and aux-loss-free balancing."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator

from tests.distributed import run_distributed
from trainer.errors import ConfigError
from trainer.model.config import ModelConfig
from trainer.model.moe import GLMMoE, Router, balance_loss, z_loss
from trainer.parallel.experts import expert_linear, uses_grouped_mm
from trainer.parallel.random import recompute
from trainer.parallel.split import split_rules_of

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, mlp="swiglu", normalization="rmsnorm",
                     add_bias_linear=False, ffn_hidden_size=64, moe_num_experts=8, moe_top_k=2,
                     moe_ffn_hidden_size=16, moe_shared_experts=1, moe_routed_scaling=2.5,
                     moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, hidden_dropout=0.0, attention_dropout=0.0)


def _tokens(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed))


# ---- the router --------------------------------------------------------------------------------------------

def test_selection_uses_the_biased_scores_and_the_weights_the_unbiased_ones():
    router = Router(dataclasses.replace(CONFIG, moe_norm_topk=False, moe_routed_scaling=1.0), 1)
    x = _tokens(64)
    scores = torch.sigmoid(x @ router.weight.t())
    unbiased = router.route(x).topk_ids
    assert torch.equal(unbiased, scores.topk(2).indices)
    router.expert_bias[5] = 10.0  # expert 5 wins every selection, however low its score
    routing = router.route(x)
    assert (routing.topk_ids == 5).any(dim=1).all()
    assert torch.equal(routing.topk_ids, (scores + router.expert_bias).topk(2).indices)
    torch.testing.assert_close(routing.topk_weights, scores.gather(1, routing.topk_ids))  # no bias in the weights
    torch.testing.assert_close(routing.scores, scores)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_weights_are_normalised_then_scaled(norm_topk):
    router = Router(dataclasses.replace(CONFIG, moe_norm_topk=norm_topk), 1)
    x = _tokens(16)
    routing = router.route(x)
    chosen = torch.sigmoid(x @ router.weight.t()).gather(1, routing.topk_ids)
    expected = chosen / chosen.sum(dim=1, keepdim=True) if norm_topk else chosen
    torch.testing.assert_close(routing.topk_weights, 2.5 * expected)
    assert routing.topk_weights.dtype == torch.float32 and routing.logits.dtype == torch.float32


def test_routing_is_dropless_and_computed_in_fp32():
    router = Router(CONFIG, 1).bfloat16()
    router.expert_bias[0] = 100.0  # every token wants expert 0 first: no capacity limit drops any
    routing = router.route(_tokens(128).bfloat16())
    assert routing.logits.dtype == torch.float32 and router.expert_bias.dtype == torch.float32
    ids = routing.topk_ids
    assert ids.shape == (128, 2) and (ids[:, 0] != ids[:, 1]).all()  # k different experts for every token
    assert torch.bincount(ids.reshape(-1), minlength=8).sum() == 128 * 2
    assert torch.bincount(ids.reshape(-1), minlength=8)[0] == 128


def test_bias_updates_from_a_skewed_start_lower_the_max_over_mean_load():
    """A router whose weights favour expert 0 for every token: the sign updates move load off it step by step."""
    router = Router(CONFIG, 1)
    x = _tokens(512)
    with torch.no_grad():
        router.weight[0] += x.mean(dim=0) / x.mean(dim=0).norm() ** 2  # + 1 on every token's logit, on average

    def imbalance() -> float:
        load = torch.bincount(router.route(x).topk_ids.reshape(-1), minlength=8).float()
        router.update_bias_(load, rate=0.005)
        return float(load.max() / load.mean())

    history = [imbalance() for _ in range(150)]
    assert history[0] > 2.0 and history[40] < history[20] < history[0]
    assert max(history[-20:]) < 1.3  # measured: 2.34 at the start, 1.10 / 1.25 alternating at the end
    assert router.expert_bias.argmin() == 0 and router.expert_bias.abs().max() <= 150 * 0.005 + 1e-6


def test_balance_loss_is_one_when_balanced_and_larger_when_not():
    scores = torch.full((8, 4), 0.5)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    torch.testing.assert_close(balance_loss(scores, balanced), torch.tensor(1.0))
    skewed = torch.tensor([[0, 1]] * 8)
    torch.testing.assert_close(balance_loss(scores, skewed), torch.tensor(1.0))  # uniform scores: f . P = 1
    peaked = torch.tensor([[0.9, 0.9, 0.1, 0.1]] * 8)
    assert balance_loss(peaked, skewed) > 1.5  # scores and choices both on experts 0 and 1
    logits = torch.randn(5, 4)
    torch.testing.assert_close(z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())


# ---- the experts -------------------------------------------------------------------------------------------

def _reference(moe: GLMMoE, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y_t = sum_j w_tj down_e(silu(gate_e x_t) * up_e x_t), token by token."""
    experts = moe.experts
    rows = []
    for t in range(x.shape[0]):
        total = torch.zeros(x.shape[1])
        for e, w in zip(ids[t].tolist(), weights[t]):
            gate, up = (experts.gate_up_weight[e] @ x[t]).chunk(2)
            total = total + w * (experts.down_weight[e] @ (F.silu(gate) * up))
        rows.append(total)
    return torch.stack(rows)


def test_grouped_experts_equal_a_per_token_reference_with_gradients():
    moe = GLMMoE(CONFIG, 2)
    x = _tokens(24).requires_grad_()
    routing = moe.router.route(x)
    ids, weights = routing.topk_ids, routing.topk_weights.detach().requires_grad_()
    ours = moe.experts(x, ids, weights)
    ours.square().sum().backward()
    grads = [x.grad, weights.grad, moe.experts.gate_up_weight.grad, moe.experts.down_weight.grad]
    for tensor in (x, weights, moe.experts.gate_up_weight, moe.experts.down_weight):
        tensor.grad = None
    theirs = _reference(moe, x, ids, weights)
    theirs.square().sum().backward()
    torch.testing.assert_close(ours, theirs)
    for got, want in zip(grads, [x.grad, weights.grad, moe.experts.gate_up_weight.grad, moe.experts.down_weight.grad]):
        torch.testing.assert_close(got, want)


def test_an_expert_that_gets_no_token_is_fine():
    moe = GLMMoE(CONFIG, 2)
    ids = torch.tensor([[1, 3]] * 5)
    x = _tokens(5)
    torch.testing.assert_close(moe.experts(x, ids, torch.full((5, 2), 0.5)), _reference(moe, x, ids, torch.full((5, 2), 0.5)))


def _expert_linear_both_ways(rows, weight, tokens_per_expert):
    """(output, grad of rows, grad of weight) of expert_linear grouped and looped."""
    results = []
    for grouped in (True, False):
        x, w = rows.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        out = expert_linear(x, w, tokens_per_expert, grouped)
        out.float().square().sum().backward()
        results.append([t.float() for t in (out, x.grad, w.grad)])
    return results


def test_grouped_and_looped_expert_matmuls_agree_with_gradients():
    """torch._grouped_mm runs forward on CPU (its own backward does not; expert_linear's backward is two more
    grouped calls): grouped and looped give the same outputs and gradients in fp32, an expert without rows
    included (zero gradient)."""
    rows, weight = _tokens(40), torch.randn(4, 24, 32, generator=torch.Generator().manual_seed(2))
    tokens_per_expert = torch.tensor([10, 0, 25, 5])
    grouped, looped = _expert_linear_both_ways(rows, weight, tokens_per_expert)
    for got, want in zip(grouped, looped):
        torch.testing.assert_close(got, want)
    assert not looped[2][1].any()
    torch.testing.assert_close(looped[0][:10], rows[:10] @ weight[0].t())


@pytest.mark.skipif(get_accelerator().device_name() == "cpu",
                    reason="the grouped kernel (torch._grouped_mm in bf16) runs on accelerators")
def test_grouped_matrix_multiply_equals_the_loop_on_the_accelerator():
    """bf16 on the accelerator: grouped against looped (outputs and gradients), with an expert without rows."""
    device = get_accelerator().device_name(0)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 128, generator=generator).to(device, torch.bfloat16)
    weight = (0.05 * torch.randn(8, 64, 128, generator=generator)).to(device, torch.bfloat16)
    tokens_per_expert = torch.tensor([30, 0, 50, 10, 40, 20, 25, 25], device=device)
    assert uses_grouped_mm(rows, weight)
    grouped, looped = _expert_linear_both_ways(rows, weight, tokens_per_expert)
    for got, want in zip(grouped, looped):
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max(), rtol=2e-2)


def test_moe_output_is_routed_plus_shared():
    moe = GLMMoE(CONFIG, 2).eval()
    hidden = _tokens(12).view(2, 6, -1)
    routing = moe.router.route(hidden.view(12, -1))
    expected = _reference(moe, hidden.view(12, -1), routing.topk_ids, routing.topk_weights).view(2, 6, -1)
    torch.testing.assert_close(moe(hidden), expected + moe.shared_expert(hidden))
    assert moe.take_statistics() is None  # evaluation records nothing


# ---- the auxiliary losses and the statistics ---------------------------------------------------------------

def test_auxiliary_losses_enter_the_gradient_scaled_but_not_the_output():
    moe = GLMMoE(CONFIG, 2)
    hidden = _tokens(12).view(2, 6, -1)
    moe.loss_grad_scale = 0.25
    out = moe(hidden)
    (0.25 * out.square().sum()).backward()
    ours = moe.router.weight.grad.clone()
    moe.router.weight.grad = None
    moe.eval()
    routing = moe.router.route(hidden.view(12, -1))
    out_eval = moe(hidden)
    torch.testing.assert_close(out, out_eval)  # the same output: the losses only add gradient
    aux = 0.01 * balance_loss(routing.scores, routing.topk_ids) + 0.001 * z_loss(routing.logits)
    (0.25 * (out_eval.square().sum() + aux)).backward()
    torch.testing.assert_close(ours, moe.router.weight.grad)
    without_aux = torch.autograd.grad(0.25 * moe(hidden).square().sum(), moe.router.weight)[0]
    assert (ours - without_aux).abs().max() > 1e-6  # the aux terms are not negligible here


def test_statistics_count_each_forward_once_under_recomputation():
    moe = GLMMoE(CONFIG, 2)
    hidden = _tokens(12).view(2, 6, -1).requires_grad_()
    plain = moe(hidden)
    plain.sum().backward()
    expected = moe.take_statistics()
    grad = moe.router.weight.grad.clone()
    moe.router.weight.grad = None
    recompute(moe, hidden).sum().backward()  # the forward runs again in backward
    stats = moe.take_statistics()
    assert stats.micro_batches == 1 and torch.equal(stats.load, expected.load) and stats.load.sum() == 12 * 2
    torch.testing.assert_close(stats.balance_loss, expected.balance_loss)
    torch.testing.assert_close(moe.router.weight.grad, grad)
    moe(hidden), moe(hidden)
    assert moe.take_statistics().micro_batches == 2 and moe.take_statistics() is None


# ---- tensor parallelism ------------------------------------------------------------------------------------

def _moe_tp2_matches_tp1(rank, world_size):
    import torch.distributed as dist

    torch.set_num_threads(1)
    single, split = GLMMoE(CONFIG, 2, None, seed=3), GLMMoE(CONFIG, 2, dist.group.WORLD, seed=3)
    hidden = _tokens(20, seed=1).view(2, 10, -1)
    outputs = []
    for moe in (single, split):
        x = hidden.clone().requires_grad_()
        out = moe(x)
        out.square().sum().backward()
        outputs.append((out, x.grad))
    torch.testing.assert_close(outputs[1][0], outputs[0][0])
    torch.testing.assert_close(outputs[1][1], outputs[0][1])
    rules = split_rules_of(single)
    params = dict(split.named_parameters())
    for name, param in single.named_parameters():
        torch.testing.assert_close(params[name].grad, rules[name].shard(param.grad, rank, world_size), msg=name)
    assert split.experts.gate_up_weight.expert_parallel and split.experts.gate_up_weight.tensor_model_parallel
    assert not getattr(split.router.weight, "tensor_model_parallel", False)
    assert torch.equal(split.take_statistics().load, single.take_statistics().load)


def test_moe_at_tp2_equals_one_process():
    run_distributed(_moe_tp2_matches_tp1, 2)


# ---- configuration -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, tp, message", [
    ({"moe_ffn_hidden_size": 18}, 4, "expert width 18 is not divisible by parallel.tp=4"),
    ({"mlp": "gelu"}, 1, "needs model.mlp=swiglu"),
    ({"moe_first_dense_layers": 2}, 1, "leaves no mixture-of-experts block"),
    ({"moe_top_k": 9}, 1, "moe_top_k=9 must be in 1..model.moe_num_experts=8"),
])
def test_bad_moe_configs_are_refused(changes, tp, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(CONFIG, **changes).validate(tp)
    CONFIG.validate(2)
