"""The dense counterpart of a mixture-of-experts model: the same model (depth, width, attention, vocabulary, MTP
layers, every other switch) with a dense MLP of one width f_d in every block, f_d chosen so that a token passes
through as many parameters in both (ModelConfig.active_parameters: routed experts counted top-k of E, the shared
experts, the router and every dense part whole).

The active parameters of the dense model are linear in its MLP width, A(f) = A(1) + (f - 1) * slope with
slope = A(2) - A(1) (3 h per block for SwiGLU without biases, the MTP layer's block included), so

    f_d = 1 + round((A_moe - A(1)) / slope)           |A(f_d) - A_moe| <= slope / 2

One width serves every block (model.ffn_hidden_size is one number), so the MoE model's leading dense blocks and its
MoE blocks are averaged into it; the matrix-multiply FLOPs per token are 6 x the active matrix parameters in both,
so the two models also compute the same FLOPs per token up to the same rounding (the router's 2 h E against the
dense width's share of it).
"""
from __future__ import annotations

import dataclasses

from trainer.config import Config
from trainer.model.config import ModelConfig


def dense_model(moe: ModelConfig, ffn_hidden_size: int) -> ModelConfig:
    """`moe` without experts, every block's MLP of width ffn_hidden_size."""
    return dataclasses.replace(moe, moe_num_experts=0, moe_first_dense_layers=0, ffn_hidden_size=ffn_hidden_size)


def dense_width(moe: ModelConfig) -> int:
    """f_d of the module docstring: the dense MLP width whose active parameters are nearest the MoE model's."""
    target = moe.active_parameters()
    at_1, at_2 = (dense_model(moe, width).active_parameters() for width in (1, 2))
    return 1 + round((target - at_1) / (at_2 - at_1))


def dense_counterpart(config: Config) -> Config:
    """The run config with the dense counterpart of its (mixture-of-experts) model, everything else the same."""
    if not config.model.moe_num_experts:
        raise ValueError("the dense counterpart is of a mixture-of-experts model (model.moe_num_experts > 0)")
    return dataclasses.replace(config, model=dense_model(config.model, dense_width(config.model)))


def counterpart_facts(moe: ModelConfig, dense: ModelConfig) -> dict:
    """What the report says about the pair: widths, active parameters and their difference."""
    difference = dense.active_parameters() - moe.active_parameters()
    return {"rule": "f_d = 1 + round((A_moe - A(1)) / (A(2) - A(1))), A(f) the dense model's active parameters",
            "dense_ffn_hidden_size": dense.ffn_size, "moe_ffn_hidden_size": moe.moe_ffn_size,
            "moe_dense_block_ffn_hidden_size": moe.ffn_size, "moe_experts": moe.moe_num_experts,
            "moe_top_k": moe.moe_top_k, "moe_shared_experts": moe.moe_shared_experts,
            "moe_active_parameters": moe.active_parameters(), "moe_total_parameters": moe.num_parameters(),
            "dense_parameters": dense.active_parameters(), "active_difference": difference,
            "active_relative_difference": difference / moe.active_parameters()}
