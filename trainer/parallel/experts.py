"""The routed experts of a mixture-of-experts layer, run as one group.

E experts, each a gated MLP h -> f -> h without biases (SwiGLU in GLM-4.5):
    Expert_e(x) = act(x A_e^T) B_e^T,   A_e = gate_up_weight[e] = [G_e; U_e]  [2f, h],   B_e = down_weight[e]  [h, f]
    y_t = sum_j w_tj Expert_{i_tj}(x_t)      (i_t1 .. i_tk: the experts token t is routed to, w_tj their weights)
At ep = 1 the (token, slot) pairs are sorted by expert (the permutation), each expert runs on its contiguous
rows, and the outputs go back to their tokens weighted (the un-permutation). The experts run either as grouped
matrix multiplies (torch._grouped_mm, on CUDA in bf16) or as a loop over the experts: the same math
(expert_linear, whose backward never keeps a view of a weight: ZeRO-3 safe).

Tensor parallelism splits every expert like the dense SwiGLU (trainer/model/mlp.py): rank r of p holds the
r-th f/p rows of both halves, [G_e^(r); U_e^(r)] (fused parts on dim 1 of gate_up_weight), and the matching
f/p columns B_e^(r) (dim 2 of down_weight), so it computes a partial sum sum_r act(x A_e^(r)T) B_e^(r)T of
each expert's output; the caller sums the partials over the tensor-parallel group. The input and the routing
weights are replicated over the group: their gradients are all-reduced over it in backward (copy_to_tp).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from trainer.parallel.expert_dispatch import combine, dispatch, local_experts
from trainer.parallel.layers import InitMethod, _partition, sharded_parameter
from trainer.parallel.mappings import Group, copy_to_tp, group_size
from trainer.parallel.split import SplitRule

Activation = Callable[[torch.Tensor], torch.Tensor]
"""[..., 2f] (gate half, then up half) -> [..., f]: swiglu of trainer/model/mlp.py."""


def uses_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the experts run as torch._grouped_mm: a CUDA tensor in bf16 (the fused kernel's case; elsewhere the
    loop) whose inner dims are multiples of 8 (16-byte aligned rows)."""
    return (hasattr(torch, "_grouped_mm") and x.device.type == "cuda" and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and weight.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0)


def permutation(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (order [T k]: the flat (token, slot) indices t k + j sorted by expert, stably;
    tokens_per_expert [E]: how many rows each expert receives)."""
    flat = topk_ids.reshape(-1)  # [T k]
    return flat.argsort(stable=True), torch.bincount(flat, minlength=num_experts)


def _per_expert_matmul(rows: torch.Tensor, weights: torch.Tensor, tokens_per_expert: torch.Tensor,
                       grouped: bool) -> torch.Tensor:
    """rows [n, K] grouped by expert, weights [E, K, N] -> [n, N], rows of expert e times weights[e]."""
    if grouped:
        return torch._grouped_mm(rows, weights, offs=tokens_per_expert.cumsum(0).to(torch.int32))
    chunks = rows.split(tokens_per_expert.tolist())  # a host read of E counts
    return torch.cat([chunk @ weight for chunk, weight in zip(chunks, weights)])


def _per_expert_outer(grad: torch.Tensor, rows: torch.Tensor, tokens_per_expert: torch.Tensor,
                      grouped: bool) -> torch.Tensor:
    """grad [n, N], rows [n, K], both grouped by expert -> [E, N, K], for expert e the sum over its rows of
    grad_n^T rows_n (zero for an expert without rows)."""
    if grouped:
        return torch._grouped_mm(grad.t(), rows, offs=tokens_per_expert.cumsum(0).to(torch.int32))
    counts = tokens_per_expert.tolist()
    return torch.stack([g.t() @ r for g, r in zip(grad.split(counts), rows.split(counts))])


class _ExpertLinear(torch.autograd.Function):
    """y_n = W_e x_n for the rows x_n of each expert e, W [E, out, in]. Saves the weight parameter itself, never a
    view of it: ZeRO-3 frees a parameter's storage after its module's forward and gathers it anew for backward,
    which would leave a saved view (W[e], W^T) empty."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor,
                grouped: bool) -> torch.Tensor:
        ctx.grouped = grouped
        ctx.save_for_backward(rows, weight, tokens_per_expert)
        return _per_expert_matmul(rows, weight.transpose(1, 2), tokens_per_expert, grouped)  # [n, out]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, weight, tokens_per_expert = ctx.saved_tensors
        grad_rows = _per_expert_matmul(grad, weight, tokens_per_expert, ctx.grouped)  # [n, in]
        grad_weight = _per_expert_outer(grad, rows, tokens_per_expert, ctx.grouped)  # [E, out, in]
        return grad_rows, grad_weight, None, None


def expert_linear(rows: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor,
                  grouped: bool) -> torch.Tensor:
    """rows [n, in] grouped by expert (tokens_per_expert [E] of them for each), weight [E, out, in] -> [n, out],
    each row times its expert's W^T: torch._grouped_mm if grouped (no host read), else a loop over the experts."""
    return _ExpertLinear.apply(rows, weight, tokens_per_expert, grouped)


class GroupedExperts(nn.Module):
    """The E routed experts of one MoE layer (module docstring). Parameters (this tensor rank's shard, full
    canonical shapes in brackets): gate_up_weight [E, 2f, h], down_weight [E, h, f]; both carry
    `expert_parallel = True`."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *, group: Group, activation: Activation,
                 init_gate_up: InitMethod, init_down: InitMethod, ep_group: Group = None):
        super().__init__()
        self.group = group
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.activation = activation
        _partition(ffn_size, group, "the expert width model.moe_ffn_hidden_size")
        self.gate_up_rule = SplitRule(dim=1, part_rows=(ffn_size, ffn_size))
        self.down_rule = SplitRule(dim=2)
        self.gate_up_weight = sharded_parameter((num_experts, 2 * ffn_size, hidden_size), self.gate_up_rule, group,
                                                init_gate_up)
        self.down_weight = sharded_parameter((num_experts, hidden_size, ffn_size), self.down_rule, group, init_down)
        # Expert parallelism: this rank keeps its block of E / ep experts (trainer/parallel/expert_dispatch.py).
        self.ep_group = ep_group
        self.gate_up_weight, self.down_weight = (local_experts(param, ep_group)
                                                 for param in (self.gate_up_weight, self.down_weight))
        for param in (self.gate_up_weight, self.down_weight):
            param.expert_parallel = True

    def split_rules(self) -> dict[str, SplitRule]:
        return {"gate_up_weight": self.gate_up_rule, "down_weight": self.down_rule}

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, h], topk_ids [T, k] int64, topk_weights [T, k] fp32 -> [T, h], this tensor rank's partial sum
        (the caller reduces over the tensor-parallel group)."""
        x, topk_weights = copy_to_tp(x, self.group), copy_to_tp(topk_weights, self.group)
        rows, tokens_per_expert, handle = dispatch(x, topk_ids, self.num_experts, self.ep_group)  # by local expert
        return combine(self.run_experts(rows, tokens_per_expert), topk_weights, handle)

    def run_experts(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """rows [n, h], grouped by expert (tokens_per_expert [E] of them for each) -> every row through its
        expert, [n, h]: grouped matrix multiplies where the device has them (uses_grouped_mm), else loops."""
        grouped = uses_grouped_mm(rows, self.gate_up_weight)
        hidden = expert_linear(rows, self.gate_up_weight, tokens_per_expert, grouped)  # [n, 2f/p]
        return expert_linear(self.activation(hidden), self.down_weight, tokens_per_expert, grouped)  # [n, h]

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, ffn={self.ffn_size}, "
                f"tp={group_size(self.group)}")
