"""The routed experts of a mixture-of-experts layer, run as one group.

E experts, each a gated MLP h -> f -> h without biases (SwiGLU in GLM-4.5):
    Expert_e(x) = act(x A_e^T) B_e^T,   A_e = gate_up_weight[e] = [G_e; U_e]  [2f, h],   B_e = down_weight[e]  [h, f]
    y_t = sum_j w_tj Expert_{i_tj}(x_t)      (i_t1 .. i_tk: the experts token t is routed to, w_tj their weights)
At ep = 1 the (token, slot) pairs are sorted by expert (the permutation), each expert runs on its contiguous
rows, and the outputs go back to their tokens weighted (the un-permutation). The experts run either as one
grouped matrix multiply (torch._grouped_mm, on CUDA in bf16) or as a loop over the experts: the same math.

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
    """Whether the experts run as torch._grouped_mm: a CUDA tensor in bf16 (the kernel's case; CPU has a forward
    but no working backward) whose inner dims are multiples of 8 (16-byte aligned rows)."""
    return (hasattr(torch, "_grouped_mm") and x.device.type == "cuda" and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and weight.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0)


def permutation(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (order [T k]: the flat (token, slot) indices t k + j sorted by expert, stably;
    tokens_per_expert [E]: how many rows each expert receives)."""
    flat = topk_ids.reshape(-1)  # [T k]
    return flat.argsort(stable=True), torch.bincount(flat, minlength=num_experts)


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
        expert, [n, h]: one grouped matrix multiply where the device has one (uses_grouped_mm), else a loop."""
        if uses_grouped_mm(rows, self.gate_up_weight):
            return self.grouped_experts(rows, tokens_per_expert)
        return self.looped_experts(rows, tokens_per_expert)

    def grouped_experts(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """run_experts as two torch._grouped_mm calls (no host read)."""
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # [E]: where each expert's rows end
        hidden = torch._grouped_mm(rows, self.gate_up_weight.transpose(1, 2), offs=offsets)  # [n, 2f/p]
        return torch._grouped_mm(self.activation(hidden), self.down_weight.transpose(1, 2), offs=offsets)

    def looped_experts(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """run_experts as a loop over the experts, two matrix multiplies each."""
        outputs = []
        for expert, expert_rows in enumerate(rows.split(tokens_per_expert.tolist())):  # a host read of E counts
            hidden = expert_rows @ self.gate_up_weight[expert].t()  # [n_e, 2f/p]
            outputs.append(self.activation(hidden) @ self.down_weight[expert].t())  # [n_e, h]
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, ffn={self.ffn_size}, "
                f"tp={group_size(self.group)}")
