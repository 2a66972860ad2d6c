"""`glm-train --print-model`: the parameters of a built model, counted, next to the closed form.

The model is built on the meta device (shapes, no storage), so even GLM-130B costs no memory. For a mixture of
experts the table adds the parameters one token uses (active): all but the routed experts it is not sent to,
i.e. everything else plus, in each MoE layer, k of the E routed experts, the shared expert and the router.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from trainer.model.config import ModelConfig
from trainer.model.glm import GLMModel
from trainer.model.moe import GLMMoE
from trainer.model.output import OutputLayer
from trainer.parallel.experts import GroupedExperts
from trainer.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def _sharded_numel(model: nn.Module) -> int:
    """Parameters that tensor parallelism splits (the rest are replicated on every tp rank)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding, OutputLayer, GroupedExperts)):
            total += sum(p.numel() for p in module.parameters(recurse=False))
        elif isinstance(module, RowParallelLinear):
            total += module.weight.numel()
    return total


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def active_parameters(model: nn.Module) -> int:
    """The parameters one token passes through: every parameter but, in each MoE layer, the E - k routed experts
    the router does not choose for it."""
    unused = 0
    for layer in model.modules():
        if isinstance(layer, GLMMoE):
            experts = layer.experts
            unused += _numel(experts) // experts.num_experts * (experts.num_experts - layer.router.top_k)
    return _numel(model) - unused


def meta_model(config: ModelConfig, tp: int = 1) -> GLMModel:
    """The whole (unsharded) model on the meta device, its vocabulary padded as for tensor-parallel size tp:
    one process cannot build a tp-sharded model, and the padding is the only count that depends on tp."""
    unsharded = dataclasses.replace(config, vocab_pad_multiple=config.vocab_pad_multiple * tp)
    with torch.device("meta"):
        return GLMModel(unsharded)


def _header(config: ModelConfig, tp: int, moe_layers: int) -> str:
    experts = (f"{moe_layers} MoE layers of {config.moe_num_experts} experts (top-{config.moe_top_k}, ffn "
               f"{config.moe_ffn_size}, {config.moe_shared_experts} shared), " if moe_layers else "")
    return (f"GLM: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads "
            f"({config.num_kv_heads} key/value), ffn {config.ffn_size} ({config.mlp}), {config.position_embedding}, "
            f"{config.norm} {config.normalization}, {experts}vocab {config.vocab_size} padded to "
            f"{config.padded_vocab_size(tp)}, output layer {'tied' if config.tie_word_embeddings else 'untied'}")


def parameter_summary(config: ModelConfig, tp: int = 1) -> str:
    """A table of the counted parameters of the model (meta_model), the closed form
    ModelConfig.num_parameters(tp), and the parameters each tensor-parallel rank holds."""
    model = meta_model(config, tp)
    layers, final_norm = model.transformer["layers"], model.transformer["final_layernorm"]
    counted, closed = _numel(model), config.num_parameters(tp)
    sharded = _sharded_numel(model)
    rows = [("embedding", _numel(model.embedding)),
            ("one block", _numel(layers[0])),
            (f"{len(layers)} blocks", _numel(layers)),
            ("final layernorm", _numel(final_norm))]
    moe = [index for index in range(config.num_layers) if config.is_moe_layer(index)]
    if moe:
        rows[1:2] = [("one dense block", _numel(layers[0])), ("one MoE block", _numel(layers[moe[0]])),
                     ("  its routed experts", _numel(layers[moe[0]].mlp.experts))]
    if model.output_layer is not None:
        rows.append(("output layer (untied)", _numel(model.output_layer)))
    rows += [("total (counted)", counted),
            ("total (closed form)", closed),
            *([("active per token (counted)", active_parameters(model))] if moe else []),
            (f"per tensor-parallel rank (tp={tp})", sharded // tp + counted - sharded)]
    header = _header(config, tp, len(moe))
    lines = [header] + [f"  {name:<36}{count:>18,}  ({count / 1e9:.3f} B)" for name, count in rows]
    lines.append("  counted == closed form" if counted == closed
                 else f"  MISMATCH: counted - closed form = {counted - closed:,}")
    return "\n".join(lines)
