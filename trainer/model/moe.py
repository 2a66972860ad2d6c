"""GLM-4.5's mixture-of-experts MLP: a sigmoid router with a score-correction bias, E routed SwiGLU experts of
which each token uses k, and a shared SwiGLU expert every token uses (../shared/GLM-SPEC.md section 7).

    logits = x W_g^T  (fp32)     s = sigmoid(logits)  [T, E]
    chosen = top-k of (s + b)    b: expert_bias, a buffer moved by load balancing only, never by gradients
    w_j = s_{chosen_j} / sum_j' s_{chosen_j'}   (moe_norm_topk)   * moe_routed_scaling
    y = sum_j w_j Expert_{chosen_j}(x) + SharedExpert(x)
Routing is dropless: every token reaches its k experts (no capacity, no dropped tokens).

Load balancing, as in DeepSeek-V3:
- aux-loss-free (GLM-4.5's): after every optimizer step each layer's bias moves b_i += rate * sign(mean_load -
  load_i), load_i the tokens routed to expert i in the step over every data-parallel rank
  (trainer/engine/moe_balance.py does it from the counts each layer records here);
- an optional auxiliary loss, moe_aux_loss_coeff * L_bal per MoE layer, over each micro-batch's T tokens:
      f_i = E / (k T) * |{t : i chosen for t}|,   P_i = 1/T sum_t s_ti / sum_j s_tj,   L_bal = sum_i f_i P_i
  (Switch Transformer's f . P with DeepSeek-V3's normalised sigmoid scores, batch-wise; 1 when every expert
  gets the same share, E / k when one expert gets all); and the router z-loss of ST-MoE, moe_z_loss_coeff * L_z,
  L_z = 1/T sum_t logsumexp_i(logits_ti)^2.
The two losses are not returned: they reach the objective through backward (add_loss_gradient), which works the
same on every pipeline stage, and the training loss the trainer reports stays the language-model loss. Each layer
records, per step, the tokens per expert and the sums of L_bal and L_z over its micro-batches (`statistics`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.config import ModelConfig
from trainer.model.init import expert_normal_init, normal_init
from trainer.model.mlp import GLMMLP, swiglu
from trainer.parallel.experts import GroupedExperts
from trainer.parallel.mappings import reduce_from_tp
from trainer.parallel.random import is_recomputing
from trainer.parallel.sequence import gather_from_sequence, reduce_scatter_to_sequence
from trainer.parallel.split import REPLICATED, SplitRule


@dataclass
class Routing:
    """What the router decides for T tokens."""
    topk_ids: torch.Tensor
    """[T, k] int64: the chosen experts, chosen by the biased scores."""
    topk_weights: torch.Tensor
    """[T, k] fp32: their weights, from the unbiased scores."""
    logits: torch.Tensor
    """[T, E] fp32."""
    scores: torch.Tensor
    """[T, E] fp32: sigmoid(logits)."""


class Router(nn.Module):
    """The sigmoid top-k router (transformers' Glm4MoeTopkRouter): weight [E, h], replicated over tensor ranks,
    applied in fp32; expert_bias [E], a persistent fp32 buffer (the score-correction bias)."""

    def __init__(self, config: ModelConfig, layer_number: int, seed: int = 0):
        super().__init__()
        self.top_k, self.norm_topk, self.scaling = config.moe_top_k, config.moe_norm_topk, config.moe_routed_scaling
        device = "meta" if torch.empty(0).is_meta else "cpu"
        weight = torch.empty(config.moe_num_experts, config.hidden_size, device=device)
        normal_init(seed, f"layers.{layer_number - 1}.mlp.router", config.init_std)(weight)
        self.weight = nn.Parameter(weight)
        self.register_buffer("expert_bias", torch.zeros(config.moe_num_experts, device=device))

    def split_rules(self) -> dict[str, SplitRule]:
        return {"weight": REPLICATED, "expert_bias": REPLICATED}

    def _apply(self, fn, recurse=True):
        """Module.to / half() / bfloat16() move expert_bias but keep it fp32: updates of moe_bias_update_rate
        would round away in bf16 (8 bits of mantissa)."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        self.expert_bias = bias.to(self.expert_bias.device)
        return self

    def route(self, x: torch.Tensor) -> Routing:
        """x [T, h] -> the routing of the T tokens (through __call__, so that module hooks run)."""
        return Routing(*self(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, h] -> Routing's fields as a tuple: ZeRO-3 gathers the weight again for backward through hooks on
        the module's output tensors, which it finds in tuples but not in a dataclass."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E] fp32 whatever the model's dtype
        scores = logits.sigmoid()
        topk_ids = (scores.detach() + self.expert_bias).topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, topk_ids)  # the unbiased scores of the chosen experts
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, weights * self.scaling, logits, scores

    @torch.no_grad()
    def update_bias_(self, load: torch.Tensor, rate: float) -> None:
        """expert_bias += rate * sign(mean(load) - load): up for the under-loaded experts, down for the
        over-loaded ones. load [E]: tokens routed to each expert (the same on every rank that calls this)."""
        self.expert_bias += bias_update(load, rate).to(self.expert_bias.device)


def bias_update(load: torch.Tensor, rate: float) -> torch.Tensor:
    """The aux-loss-free balancing step for loads [E]: rate * sign(mean load - load), fp32."""
    load = load.float()
    return rate * torch.sign(load.mean() - load)


def balance_loss(scores: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """L_bal = sum_i f_i P_i (module docstring) of scores [T, E] and the choices topk_ids [T, k]; 0-dim fp32,
    differentiable in the scores."""
    tokens, experts = scores.shape
    k = topk_ids.shape[1]
    share = torch.bincount(topk_ids.reshape(-1), minlength=experts).float() * experts / (k * tokens)  # f [E]
    probability = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)  # P [E]
    return (share * probability).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_z = mean over tokens of logsumexp(logits)^2, logits [T, E] fp32; 0-dim."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class _AddLossGradient(torch.autograd.Function):
    """forward: hidden unchanged; backward: hidden's gradient unchanged, and `loss` gets gradient `scale`, as if
    scale * loss had been added to the objective whose gradient reaches hidden."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return hidden

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


def add_loss_gradient(hidden: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    """forward: hidden; backward: also d(scale * loss) into loss's graph (Megatron's MoEAuxLossAutoScaler idea).
    `scale` is what the engine multiplies the micro-batch loss by before backward (1 / gradient accumulation
    steps, times the fp16 loss scale), so an auxiliary loss on any pipeline stage enters the gradient exactly as
    if it had been added to that micro-batch's loss."""
    return _AddLossGradient.apply(hidden, loss, scale)


@dataclass
class RoutingStatistics:
    """What one MoE layer recorded since the last take_statistics(), from its training forwards."""
    load: torch.Tensor
    """[E] int64: tokens routed to each expert (every (token, slot) pair counts once)."""
    balance_loss: torch.Tensor
    """0-dim fp32: the sum of L_bal over the micro-batches."""
    z_loss: torch.Tensor
    """0-dim fp32: the sum of L_z over the micro-batches."""
    micro_batches: int


def shared_expert_config(config: ModelConfig) -> ModelConfig:
    """The shared experts as one dense SwiGLU of moe_shared_experts * moe_ffn_size width, no biases."""
    return dataclasses.replace(config, ffn_hidden_size=config.moe_shared_experts * config.moe_ffn_size,
                               mlp="swiglu", add_bias_linear=False)


class GLMMoE(nn.Module):
    """The MoE MLP of block `layer_number` (1-based): router, experts (trainer/parallel/experts.py) and, if
    model.moe_shared_experts, shared_expert (a GLMMLP). forward(hidden [b, s, h]) -> [b, s, h]. The routed
    experts' init follows the dense MLP's: N(0, init_std) into the expert, N(0, init_std / sqrt(2N)) out.
    Sequence-parallel: hidden is this tensor rank's tokens [b, s/tp, h]; the router and the experts see the
    whole row, all-gathered (so routing, load and the auxiliary losses are those of plain tp), and the routed
    sum is reduce-scattered back to [b, s/tp, h]."""

    def __init__(self, config: ModelConfig, layer_number: int, tp_group=None, seed: int = 0, ep_group=None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.layer_index, self.num_experts = layer_number - 1, config.moe_num_experts
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.aux_loss_coeff, self.z_loss_coeff = config.moe_aux_loss_coeff, config.moe_z_loss_coeff
        # add_loss_gradient's scale: the factor the engine applies to a micro-batch's loss before backward
        # (trainer/engine/moe_balance.py sets it every step; 1 for a plain loss.backward()).
        self.loss_grad_scale = 1.0
        name = f"layers.{self.layer_index}.mlp.experts"
        std_out = config.init_std / math.sqrt(2 * config.num_layers)
        self.router = Router(config, layer_number, seed)
        self.experts = GroupedExperts(
            config.moe_num_experts, config.hidden_size, config.moe_ffn_size, group=tp_group, activation=swiglu,
            init_gate_up=expert_normal_init(seed, f"{name}.gate_up_weight", config.init_std),
            init_down=expert_normal_init(seed, f"{name}.down_weight", std_out), ep_group=ep_group)
        self.shared_expert: Optional[GLMMLP] = (GLMMLP(shared_expert_config(config), layer_number, tp_group, seed,
                                                       sequence_parallel) if config.moe_shared_experts else None)
        self._statistics: Optional[RoutingStatistics] = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, h] (replicated over the tp group) -> [b, s, h]; sequence-parallel [b, s/tp, h] -> the
        same. The gathered row's gradient is already whole on every rank (the experts sum it over tp, the router
        is replicated), so the gather's backward only keeps this rank's tokens."""
        row = gather_from_sequence(hidden, self.tp_group) if self.sequence_parallel else hidden  # [b, s, h]
        b, s, h = row.shape
        x = row.reshape(b * s, h)  # [T, h]
        routing = self.router.route(x)
        routed = self.experts(x, routing.topk_ids, routing.topk_weights).view(b, s, h)  # a partial sum over tp
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence(routed, self.tp_group)  # [b, s/tp, h]
        else:
            out = reduce_from_tp(routed, self.tp_group)
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden)
        if not self.training:
            return out
        balance = balance_loss(routing.scores, routing.topk_ids)
        z = z_loss(routing.logits)
        if not is_recomputing():  # a recomputation replays a forward whose routing is already counted
            self._record(routing.topk_ids, balance, z)
        if torch.is_grad_enabled() and (self.aux_loss_coeff or self.z_loss_coeff):
            out = add_loss_gradient(out, self.aux_loss_coeff * balance + self.z_loss_coeff * z, self.loss_grad_scale)
        return out

    def _record(self, topk_ids: torch.Tensor, balance: torch.Tensor, z: torch.Tensor) -> None:
        """Add one micro-batch's routing to the statistics (device tensors: no host read here)."""
        load = torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts)
        stats = self._statistics
        if stats is None:
            self._statistics = RoutingStatistics(load, balance.detach(), z.detach(), 1)
            return
        stats.load = stats.load + load
        stats.balance_loss = stats.balance_loss + balance.detach()
        stats.z_loss = stats.z_loss + z.detach()
        stats.micro_batches += 1

    def take_statistics(self) -> Optional[RoutingStatistics]:
        """What the training forwards recorded since the last call (None if none ran), and start afresh."""
        stats, self._statistics = self._statistics, None
        return stats
