"""transformers' `glm4_moe` (Glm4MoeForCausalLM: GLM-4.5, 4.6, 4.7, GLM-4.5-Air) <-> canonical weights and config.

Canonical <- glm4_moe names (layer i of N main layers; the MTP layer is model.layers.N):
    embedding.word_embeddings.weight                 model.embed_tokens.weight
    transformer.layers.i.                            model.layers.i.  (the block names below)
    transformer.final_layernorm.weight               model.norm.weight
    output_layer.weight                              lm_head.weight (absent when tied)
  block names (BLOCK), under transformer.layers.i. or mtp.layers.0.block.:
    input_layernorm.weight                           input_layernorm.weight
    attention.query_key_value.{weight,bias}          [q_proj; k_proj; v_proj] of self_attn
    attention.dense.weight                           self_attn.o_proj.weight
    attention.{q,k}_norm.weight                      self_attn.{q,k}_norm.weight (use_qk_norm)
    post_attention_layernorm.weight                  post_attention_layernorm.weight
    mlp.dense_h_to_4h.weight / dense_4h_to_h.weight  mlp.[gate_proj; up_proj] / mlp.down_proj (dense layers)
    mlp.router.weight                                mlp.gate.weight (fp32)
    mlp.router.expert_bias                           mlp.gate.e_score_correction_bias
    mlp.experts.gate_up_weight [E, 2f, h]            mlp.experts.{e}.[gate_proj; up_proj].weight, e = 0..E-1
                                                     (or transformers' fused mlp.experts.gate_up_proj)
    mlp.experts.down_weight [E, h, f]                mlp.experts.{e}.down_proj.weight (or mlp.experts.down_proj)
    mlp.shared_expert.dense_h_to_4h / dense_4h_to_h  mlp.shared_experts.[gate_proj; up_proj] / down_proj
  the MTP layer (num_nextn_predict_layers = 1), read from and written to the files directly (transformers drops
  model.layers.N.* on load):
    mtp.layers.0.enorm / hnorm / eh_proj .weight     model.layers.N.enorm / hnorm / eh_proj .weight
    mtp.layers.0.final_layernorm.weight              model.layers.N.shared_head.norm.weight
    (the shared head and embedding)                  model.layers.N.shared_head.head.weight = lm_head.weight and
                                                     model.layers.N.embed_tokens.weight = model.embed_tokens.weight:
                                                     copies, optional on import (GLM-4.6 ships neither), written
                                                     on export as GLM-4.5's release has them
glm4_moe is pre-RMSNorm, SwiGLU, no o_proj bias, rotary on the first partial_rotary_factor of each head with
rotate_half pairs (x_i, x_{i + r/2}), causal; its router is sigmoid, chosen by score + bias, weighted by the
normalised plain scores times routed_scaling_factor (GLM-SPEC section 7); group-limited routing (n_group > 1)
and heads of another width than hidden_size / num_attention_heads are refused.
"""
from __future__ import annotations

import torch

from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig
from trainer.model.mtp import MTP_PREFIX

MODEL_TYPE, ARCHITECTURE = "glm4_moe", "Glm4MoeForCausalLM"
TOP_LEVEL = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
             "model.norm.weight": "transformer.final_layernorm.weight", "lm_head.weight": "output_layer.weight"}
BLOCK = {"input_layernorm.weight": "input_layernorm.weight", "self_attn.o_proj.weight": "attention.dense.weight",
         "post_attention_layernorm.weight": "post_attention_layernorm.weight"}
QK_NORM = {"self_attn.q_norm.weight": "attention.q_norm.weight", "self_attn.k_norm.weight": "attention.k_norm.weight"}
ROUTER = {"mlp.gate.weight": "mlp.router.weight", "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias"}
MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
           "shared_head.norm.weight": "final_layernorm.weight"}
MTP_COPIES = {"shared_head.head.weight": "lm_head.weight", "embed_tokens.weight": "model.embed_tokens.weight"}
"""The MTP layer's copies of the shared tensors (its name -> the shared one's glm4_moe name)."""
FP32_SUFFIXES = tuple(ROUTER)
"""The router's tensors, kept in fp32 whatever the export dtype (transformers keeps them fp32 too)."""
QKV = ("q_proj", "k_proj", "v_proj")
SWIGLU = ("gate_proj", "up_proj")


def model_config(meta: dict, rope: tuple[float, float], mtp_in_files: bool) -> ModelConfig:
    """A glm4_moe config.json -> ModelConfig; rope = (rope_theta, partial_rotary_factor); the MTP layer only when
    the files hold it (a save_pretrained copy has lost it)."""
    if meta.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {meta['hidden_act']!r} is not supported: glm4_moe uses silu (SwiGLU)")
    if meta.get("n_group", 1) != 1 or meta.get("topk_group", 1) != 1:
        raise CheckpointError("group-limited routing (n_group or topk_group > 1) is not supported: GLM-4.5 routes "
                              "over all experts (n_group = topk_group = 1)")
    h, n, layers = meta["hidden_size"], meta["num_attention_heads"], meta["num_hidden_layers"]
    head_dim = meta.get("head_dim") or h // n
    kv_channels = None if head_dim * n == h else head_dim  # GLM-4.5: 96 heads of 128 at width 5120
    mtp = int(meta.get("num_nextn_predict_layers", 0)) if mtp_in_files else 0
    dense = meta.get("first_k_dense_replace", 1)
    moe = {} if dense >= layers + mtp else dict(  # no MoE layer: the dense model, its moe_* keys at their defaults
        moe_num_experts=meta["n_routed_experts"], moe_top_k=meta.get("num_experts_per_tok", 8),
        moe_ffn_hidden_size=meta.get("moe_intermediate_size"), moe_shared_experts=meta.get("n_shared_experts", 0),
        moe_first_dense_layers=dense, moe_routed_scaling=float(meta.get("routed_scaling_factor", 1.0)),
        moe_norm_topk=bool(meta.get("norm_topk_prob", True)))
    return ModelConfig(num_layers=layers, hidden_size=h, num_attention_heads=n,
                       kv_channels=kv_channels, num_key_value_heads=meta.get("num_key_value_heads") or n, vocab_size=meta["vocab_size"],
                       max_sequence_length=meta["max_position_embeddings"], ffn_hidden_size=meta["intermediate_size"],
                       position_embedding="rope_1d", rope_base=rope[0], rotary_fraction=rope[1],
                       rotary_pairing="half", normalization="rmsnorm", mlp="swiglu",
                       layernorm_epsilon=meta.get("rms_norm_eps", 1e-5), add_bias_linear=False,
                       add_qkv_bias=meta.get("attention_bias", False),
                       tie_word_embeddings=meta.get("tie_word_embeddings", False), hidden_dropout=0.0,
                       attention_dropout=float(meta.get("attention_dropout", 0.0)),
                       qk_norm=bool(meta.get("use_qk_norm", False)), mtp_layers=mtp, **moe)


def has_mtp_tensors(names, meta: dict) -> bool:
    """Whether the files hold the MTP layer that config.json announces (model.layers.N.eh_proj.weight)."""
    return f"model.layers.{meta['num_hidden_layers']}.eh_proj.weight" in names


def _block_to_canonical(tensors: dict, source: str, target: str, config: ModelConfig, moe: bool) -> dict:
    """One glm4_moe decoder layer's tensors (prefix `source`) -> canonical names under `target`."""
    out = {target + ours: tensors[source + theirs] for theirs, ours in BLOCK.items()}
    if config.qk_norm:
        out.update({target + ours: tensors[source + theirs] for theirs, ours in QK_NORM.items()})
    for kind in ("weight", "bias") if config.add_qkv_bias else ("weight",):
        out[f"{target}attention.query_key_value.{kind}"] = torch.cat(
            [tensors[f"{source}self_attn.{proj}.{kind}"] for proj in QKV])
    if not moe:
        out[target + "mlp.dense_h_to_4h.weight"] = torch.cat([tensors[f"{source}mlp.{p}.weight"] for p in SWIGLU])
        out[target + "mlp.dense_4h_to_h.weight"] = tensors[source + "mlp.down_proj.weight"]
        return out
    out.update({target + ours: tensors[source + theirs] for theirs, ours in ROUTER.items()})
    experts = f"{source}mlp.experts."
    if experts + "gate_up_proj" in tensors:  # transformers' fused form [E, 2f, h], [E, h, f]
        out[target + "mlp.experts.gate_up_weight"] = tensors[experts + "gate_up_proj"]
        out[target + "mlp.experts.down_weight"] = tensors[experts + "down_proj"]
    else:
        E = config.moe_num_experts
        out[target + "mlp.experts.gate_up_weight"] = torch.stack(
            [torch.cat([tensors[f"{experts}{e}.{p}.weight"] for p in SWIGLU]) for e in range(E)])  # [E, 2f, h]
        out[target + "mlp.experts.down_weight"] = torch.stack(
            [tensors[f"{experts}{e}.down_proj.weight"] for e in range(E)])  # [E, h, f]
    shared = f"{source}mlp.shared_experts."
    if config.moe_shared_experts:
        out[target + "mlp.shared_expert.dense_h_to_4h.weight"] = torch.cat(
            [tensors[f"{shared}{p}.weight"] for p in SWIGLU])
        out[target + "mlp.shared_expert.dense_4h_to_h.weight"] = tensors[shared + "down_proj.weight"]
    return out


def canonical_from_glm4_moe(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """glm4_moe tensors (the MTP layer's included) -> canonical fp32 weights."""
    canonical = {ours: tensors[theirs] for theirs, ours in TOP_LEVEL.items() if theirs in tensors}
    for i in range(config.num_layers):
        canonical.update(_block_to_canonical(tensors, f"model.layers.{i}.", f"transformer.layers.{i}.", config,
                                             config.is_moe_layer(i)))
    for depth in range(config.mtp_layers):
        source, target = f"model.layers.{config.num_layers + depth}.", f"{MTP_PREFIX}.{depth}."
        canonical.update({target + ours: tensors[source + theirs] for theirs, ours in MTP_OWN.items()})
        canonical.update(_block_to_canonical(tensors, source, target + "block.", config,
                                             config.is_moe_layer(config.num_layers + depth)))
        for copy, shared in MTP_COPIES.items():
            original = tensors.get(shared, tensors["model.embed_tokens.weight"])  # a tied lm_head is the embedding
            if source + copy in tensors and not torch.equal(tensors[source + copy], original):
                raise CheckpointError(f"{source + copy} differs from {shared}: this trainer's MTP layer shares the "
                                      f"output head and the word embedding with the main model")
    return {name: value.float() for name, value in canonical.items()}


def _block_from_canonical(canonical: dict, source: str, target: str, config: ModelConfig, moe: bool) -> dict:
    """One block's canonical tensors (prefix `source`) -> glm4_moe names under `target` (per-expert names)."""
    out = {}
    for kind in ("weight", "bias") if config.add_qkv_bias else ("weight",):
        parts = canonical[f"{source}attention.query_key_value.{kind}"].split(config.qkv_rows)
        out.update({f"{target}self_attn.{proj}.{kind}": part for proj, part in zip(QKV, parts)})
    out.update({target + theirs: canonical[source + ours] for theirs, ours in BLOCK.items()})
    if config.qk_norm:
        out.update({target + theirs: canonical[source + ours] for theirs, ours in QK_NORM.items()})
    if not moe:
        gate, up = canonical[source + "mlp.dense_h_to_4h.weight"].chunk(2)
        out.update({f"{target}mlp.gate_proj.weight": gate, f"{target}mlp.up_proj.weight": up,
                    f"{target}mlp.down_proj.weight": canonical[source + "mlp.dense_4h_to_h.weight"]})
        return out
    out.update({target + theirs: canonical[source + ours] for theirs, ours in ROUTER.items()})
    gate_up, down = canonical[source + "mlp.experts.gate_up_weight"], canonical[source + "mlp.experts.down_weight"]
    for e in range(config.moe_num_experts):
        gate, up = gate_up[e].chunk(2)  # [f, h] each
        out.update({f"{target}mlp.experts.{e}.gate_proj.weight": gate, f"{target}mlp.experts.{e}.up_proj.weight": up,
                    f"{target}mlp.experts.{e}.down_proj.weight": down[e]})
    if config.moe_shared_experts:
        gate, up = canonical[source + "mlp.shared_expert.dense_h_to_4h.weight"].chunk(2)
        out.update({f"{target}mlp.shared_experts.gate_proj.weight": gate,
                    f"{target}mlp.shared_experts.up_proj.weight": up,
                    f"{target}mlp.shared_experts.down_proj.weight":
                        canonical[source + "mlp.shared_expert.dense_4h_to_h.weight"]})
    return out


def glm4_moe_tensors(canonical: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical weights -> glm4_moe names in the model's order, the MTP layer's included."""
    tensors = {"model.embed_tokens.weight": canonical["embedding.word_embeddings.weight"]}
    for i in range(config.num_layers):
        tensors.update(_block_from_canonical(canonical, f"transformer.layers.{i}.", f"model.layers.{i}.", config,
                                             config.is_moe_layer(i)))
    tensors["model.norm.weight"] = canonical["transformer.final_layernorm.weight"]
    head = canonical["embedding.word_embeddings.weight" if config.tie_word_embeddings else "output_layer.weight"]
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = head
    for depth in range(config.mtp_layers):
        source, target = f"{MTP_PREFIX}.{depth}.", f"model.layers.{config.num_layers + depth}."
        tensors.update({target + theirs: canonical[source + ours] for theirs, ours in MTP_OWN.items()})
        tensors.update(_block_from_canonical(canonical, source + "block.", target, config,
                                             config.is_moe_layer(config.num_layers + depth)))
        tensors[target + "shared_head.head.weight"] = head.clone()  # copies: safetensors refuses shared memory
        tensors[target + "embed_tokens.weight"] = canonical["embedding.word_embeddings.weight"].clone()
    return tensors


def unsupported(config: ModelConfig) -> list[str]:
    """Why glm4_moe cannot express this model (empty when it can)."""
    expected = {"position_embedding": "rope_1d", "rotary_pairing": "half", "norm": "pre_ln",
                "normalization": "rmsnorm", "mlp": "swiglu", "add_bias_linear": False}
    return [f"model.{key}={getattr(config, key)!r} (glm4_moe has {value!r})" for key, value in expected.items()
            if getattr(config, key) != value]


def glm4_moe_config(config: ModelConfig, dtype: torch.dtype, special_ids: dict[str, object]) -> dict:
    """transformers' glm4_moe config.json of the model; special_ids: pad/bos/eos_token_id (None when unknown).
    A model without experts is written with every layer dense (first_k_dense_replace past the last layer)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_base, "partial_rotary_factor": config.rotary_fraction}
    layers = config.num_layers + config.mtp_layers
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "intermediate_size": config.ffn_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
            "max_position_embeddings": config.max_sequence_length, "rms_norm_eps": config.layernorm_epsilon,
            "attention_bias": config.add_qkv_bias, "attention_dropout": config.attention_dropout,
            "tie_word_embeddings": config.tie_word_embeddings, "initializer_range": config.init_std,
            "use_qk_norm": config.qk_norm, "n_routed_experts": config.moe_num_experts or 1,
            "num_experts_per_tok": config.moe_top_k if config.moe_num_experts else 1,
            "moe_intermediate_size": config.moe_ffn_size, "n_shared_experts": config.moe_shared_experts,
            "first_k_dense_replace": config.moe_first_dense_layers if config.moe_num_experts else layers,
            "routed_scaling_factor": config.moe_routed_scaling, "norm_topk_prob": config.moe_norm_topk,
            "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": config.mtp_layers,
            "rope_parameters": rope, "partial_rotary_factor": config.rotary_fraction, "rope_theta": config.rope_base,
            "dtype": str(dtype).removeprefix("torch."), "use_cache": True, **special_ids}
