"""The bridge to HF transformers: read a `glm` (GlmForCausalLM), `glm4_moe` (Glm4MoeForCausalLM: GLM-4.5 and its
successors, names in trainer/checkpoint/hf_moe.py) or ChatGLM2/3 (`chatglm`, remote code) directory, and write one
that `AutoModelForCausalLM.from_pretrained(DIR)` loads with no remote code (glm, or glm4_moe for a model with
rotate_half pairs, QK-norm, experts or an MTP layer, whose tensors are written into the files as the release has).

A directory is config.json plus model.safetensors, or model-0000i-of-0000n.safetensors shards listed in
model.safetensors.index.json. Canonical <- transformers' glm names (layer i):
    embedding.word_embeddings.weight                 model.embed_tokens.weight
    transformer.layers.i.input_layernorm.weight      model.layers.i.input_layernorm.weight
    ...attention.query_key_value.{weight,bias}       [q_proj; k_proj; v_proj] of model.layers.i.self_attn
    ...attention.dense.weight                        model.layers.i.self_attn.o_proj.weight
    ...post_attention_layernorm.weight               model.layers.i.post_attention_layernorm.weight
    ...mlp.dense_h_to_4h.weight                      model.layers.i.mlp.gate_up_proj.weight ([gate; up] both)
    ...mlp.dense_4h_to_h.weight                      model.layers.i.mlp.down_proj.weight
    transformer.final_layernorm.weight               model.norm.weight
    output_layer.weight                              lm_head.weight (absent when tied)
ChatGLM2/3 name the same tensors transformer.embedding.*, transformer.encoder.layers.i.self_attention.*,
transformer.encoder.final_layernorm.*, transformer.output_layer.*, with query_key_value already fused
[all q; all k; all v] as ours. transformers' glm is pre-RMSNorm, SwiGLU, rotary on the first
partial_rotary_factor of each head with interleaved pairs, positions 0, 1, 2, ... and causal attention:
a model with another switch (GLM-2021, GLM-130B, ChatGLM-6B) has no transformers class and is refused.

ChatGLM-6B (the first generation, remote code; model type chatglm with position_encoding_2d) is read too: its
names are ours below the top level (transformer.word_embeddings.weight is embedding.word_embeddings.weight,
transformer.layers.i.* and transformer.final_layernorm.* are the same), its lm_head.weight is the tied word
embedding, and its query_key_value holds each head's rows together, [q_1; k_1; v_1; ...; q_n; k_n; v_n] (the
release views the output as [n, 3 d] and splits the last dim), reordered to ours [all q; all k; all v]. Its
switches: deepnorm (x <- alpha LN(x) + f(LN(x))), rope_2d with half pairs, GeLU, LayerNorm, biases everywhere,
the FP32 softmax with query-key layer scaling.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from trainer.checkpoint import hf_moe
from trainer.checkpoint.layout import WORD_EMBEDDINGS, canonical_shapes
from trainer.data.tokenizer import EOT, load_tokenizer
from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig
from trainer.paths import give_default_mode
from trainer.model.output import OUTPUT_WEIGHT

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG = "generation_config.json", "tokenizer.json", "tokenizer_config.json"
MODEL_TYPES = ("glm", "chatglm", hf_moe.MODEL_TYPE)
GLM_TOP_LEVEL = {"model.embed_tokens.weight": WORD_EMBEDDINGS,
                 "model.norm.weight": "transformer.final_layernorm.weight", "lm_head.weight": OUTPUT_WEIGHT}
GLM_LAYER = {"input_layernorm.weight": "input_layernorm.weight", "self_attn.o_proj.weight": "attention.dense.weight",
             "post_attention_layernorm.weight": "post_attention_layernorm.weight",
             "mlp.gate_up_proj.weight": "mlp.dense_h_to_4h.weight", "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight"}
"""transformers' glm names -> canonical names (per layer: the suffix after model.layers.i.)."""
CHATGLM_PREFIXES = (("transformer.embedding.", "embedding."), ("transformer.encoder.layers.", "transformer.layers."),
                    ("transformer.encoder.final_layernorm.", "transformer.final_layernorm."),
                    ("transformer.output_layer.", "output_layer."))
QKV = ("q_proj", "k_proj", "v_proj")
DEFAULT_MAX_SHARD_BYTES = 5 * 2 ** 30
"""transformers' default shard size."""


def is_hf_directory(path: Path) -> bool:
    """A directory whose config.json names a model type this bridge reads (glm, glm4_moe or chatglm)."""
    try:
        return json.loads((path / CONFIG).read_text()).get("model_type") in MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def _rope(meta: dict) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from transformers' rope_parameters or the older top-level keys."""
    rope = meta.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"rope type {rope['rope_type']!r} is not supported: only the default (unscaled) RoPE")
    theta = rope.get("rope_theta", meta.get("rope_theta", 10000.0))
    return float(theta), float(rope.get("partial_rotary_factor", meta.get("partial_rotary_factor", 0.5)))


def glm_model_config(meta: dict) -> ModelConfig:
    """A transformers `glm` config.json -> ModelConfig."""
    if meta.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {meta['hidden_act']!r} is not supported: glm checkpoints use silu (SwiGLU)")
    h, n = meta["hidden_size"], meta["num_attention_heads"]
    head_dim = meta.get("head_dim") or h // n
    kv_channels = None if head_dim * n == h else head_dim  # GLM-4.5: 96 heads of 128 at width 5120
    theta, fraction = _rope(meta)
    return ModelConfig(num_layers=meta["num_hidden_layers"], hidden_size=h, num_attention_heads=n,
                       kv_channels=kv_channels, num_key_value_heads=meta.get("num_key_value_heads") or n, vocab_size=meta["vocab_size"],
                       max_sequence_length=meta["max_position_embeddings"], ffn_hidden_size=meta["intermediate_size"],
                       position_embedding="rope_1d", rope_base=theta, rotary_fraction=fraction,
                       rotary_pairing="interleaved", normalization="rmsnorm", mlp="swiglu",
                       layernorm_epsilon=meta.get("rms_norm_eps", 1e-6), add_bias_linear=False,
                       add_qkv_bias=meta.get("attention_bias", True),
                       tie_word_embeddings=meta.get("tie_word_embeddings", False),
                       hidden_dropout=0.0, attention_dropout=float(meta.get("attention_dropout", 0.0)))


def chatglm_6b_model_config(meta: dict) -> ModelConfig:
    """A ChatGLM-6B (first generation, remote code) config.json -> ModelConfig (the module docstring's switches)."""
    if not meta.get("position_encoding_2d"):
        raise CheckpointError("a ChatGLM-6B checkpoint without position_encoding_2d (1D rotary) is not supported: "
                              "only the released 2D rotary")
    h, n = meta["hidden_size"], meta["num_attention_heads"]
    return ModelConfig(num_layers=meta["num_layers"], hidden_size=h, num_attention_heads=n,
                       vocab_size=meta["vocab_size"], max_sequence_length=meta["max_sequence_length"],
                       ffn_hidden_size=meta["inner_hidden_size"], position_embedding="rope_2d", rotary_pairing="half",
                       norm="deepnorm", normalization="layernorm", mlp="gelu",
                       layernorm_epsilon=meta.get("layernorm_epsilon", 1e-5), fp32_softmax_layer_scaling=True,
                       hidden_dropout=0.0, attention_dropout=0.0)


def chatglm_model_config(meta: dict) -> ModelConfig:
    """A ChatGLM2/3 (remote code) config.json -> ModelConfig."""
    if meta.get("apply_residual_connection_post_layernorm") or not meta.get("rmsnorm", True):
        raise CheckpointError("ChatGLM checkpoints with post-LN residuals or LayerNorm are not supported")
    h, n = meta["hidden_size"], meta["num_attention_heads"]
    if meta.get("kv_channels", h // n) * n != h:
        raise CheckpointError(f"kv_channels {meta['kv_channels']} * {n} heads != hidden_size {h}")
    kv_heads = meta["multi_query_group_num"] if meta.get("multi_query_attention") else n
    return ModelConfig(num_layers=meta["num_layers"], hidden_size=h, num_attention_heads=n,
                       num_key_value_heads=kv_heads, vocab_size=meta["padded_vocab_size"],
                       max_sequence_length=meta["seq_length"], ffn_hidden_size=meta["ffn_hidden_size"],
                       position_embedding="rope_1d", rope_base=10000.0 * meta.get("rope_ratio", 1.0),
                       rotary_fraction=0.5, rotary_pairing="interleaved", normalization="rmsnorm", mlp="swiglu",
                       layernorm_epsilon=meta.get("layernorm_epsilon", 1e-5),
                       add_bias_linear=meta.get("add_bias_linear", False), add_qkv_bias=meta.get("add_qkv_bias", True),
                       tie_word_embeddings=meta.get("tie_word_embeddings", False),
                       hidden_dropout=0.0, attention_dropout=0.0)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    if (path / WEIGHTS).is_file():
        return load_file(str(path / WEIGHTS))
    if not (path / INDEX).is_file():
        raise CheckpointError(f"{path} has neither {WEIGHTS} nor {INDEX}: only safetensors checkpoints are read "
                              f"(convert pytorch_model*.bin files to safetensors first)")
    shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise CheckpointError(f"{path / shard} (listed in {INDEX}) is missing")
        tensors.update(load_file(str(path / shard)))
    return tensors


def canonical_from_glm(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' glm tensors -> canonical fp32 weights (q, k, v fused)."""
    canonical = {GLM_TOP_LEVEL[name]: value for name, value in tensors.items() if name in GLM_TOP_LEVEL}
    for i in range(config.num_layers):
        source, target = f"model.layers.{i}.", f"transformer.layers.{i}."
        for suffix, ours in GLM_LAYER.items():
            canonical[target + ours] = tensors[source + suffix]
        kinds = ("weight", "bias") if config.add_qkv_bias else ("weight",)
        for kind in kinds:
            parts = [tensors[f"{source}self_attn.{proj}.{kind}"] for proj in QKV]
            canonical[f"{target}attention.query_key_value.{kind}"] = torch.cat(parts, dim=0)
    return {name: value.float() for name, value in canonical.items()}


def canonical_from_chatglm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ChatGLM2/3 tensors -> canonical fp32 weights (prefix renames; the rotary buffer is dropped)."""
    canonical = {}
    for name, value in tensors.items():
        for prefix, ours in CHATGLM_PREFIXES:
            if name.startswith(prefix):
                canonical[ours + name[len(prefix):].replace("self_attention.", "attention.")] = value.float()
    return canonical


def qkv_from_per_head(value: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """ChatGLM-6B's query_key_value weight or bias, [q_1; k_1; v_1; ...; q_n; k_n; v_n] on dim 0, -> ours,
    [q_1 .. q_n; k_1 .. k_n; v_1 .. v_n]."""
    per_head = value.unflatten(0, (heads, 3, head_dim))  # [n, 3, d, ...]
    return per_head.transpose(0, 1).flatten(0, 2)  # [3 n d, ...]


def canonical_from_chatglm_6b(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """ChatGLM-6B tensors -> canonical fp32 weights (module docstring); the rotary buffers are dropped and the tied
    lm_head.weight must equal the word embedding."""
    word = "transformer.word_embeddings.weight"
    canonical = {}
    for name, value in tensors.items():
        if name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
            continue
        if ".attention.query_key_value." in name:
            value = qkv_from_per_head(value, config.num_attention_heads, config.head_dim)
        canonical[WORD_EMBEDDINGS if name == word else name] = value.float()
    if "lm_head.weight" in tensors and word in tensors and not torch.equal(tensors["lm_head.weight"], tensors[word]):
        raise CheckpointError("lm_head.weight differs from transformer.word_embeddings.weight, which ChatGLM-6B ties "
                              "to it: this is not a ChatGLM-6B checkpoint")
    return canonical


def read_hf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A transformers directory of model type glm, glm4_moe or chatglm (ChatGLM-6B or ChatGLM2/3) -> (ModelConfig,
    canonical fp32 weights)."""
    meta = json.loads((path / CONFIG).read_text())
    try:
        if meta["model_type"] == "glm":
            config = glm_model_config(meta)
            weights = canonical_from_glm(read_tensors(path), config)
        elif meta["model_type"] == hf_moe.MODEL_TYPE:
            tensors = read_tensors(path)  # the MTP layer's model.layers.N.* too, which transformers drops
            config = hf_moe.model_config(meta, _rope(meta), hf_moe.has_mtp_tensors(tensors, meta))
            weights = hf_moe.canonical_from_glm4_moe(tensors, config)
        elif "position_encoding_2d" in meta:
            config = chatglm_6b_model_config(meta)
            weights = canonical_from_chatglm_6b(read_tensors(path), config)
        else:
            config = chatglm_model_config(meta)
            weights = canonical_from_chatglm(read_tensors(path))
    except KeyError as missing:
        raise CheckpointError(f"{path} lacks {missing} for a {meta['model_type']} checkpoint") from None
    config.validate()
    expected = canonical_shapes(config)
    if set(weights) != set(expected):
        extra, lacking = sorted(set(weights) - set(expected)), sorted(set(expected) - set(weights))
        raise CheckpointError(f"{path} does not hold the tensors of its config.json: missing {lacking[:3]}, "
                              f"unexpected {extra[:3]}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(weights[name].shape)}, config.json says "
                                  f"{tuple(shape)}")
    return config, weights


def is_glm4_moe(config: ModelConfig) -> bool:
    """Whether the export is a glm4_moe directory: rotate_half pairs, QK-norm, experts or an MTP layer (the GLM-4.5
    switches transformers' glm lacks), else glm."""
    half_rotary = config.position_embedding == "rope_1d" and config.rotary_pairing == "half"
    return half_rotary or config.qk_norm or config.moe_num_experts > 0 or config.mtp_layers > 0


def hf_unsupported(config: ModelConfig) -> list[str]:
    """Why transformers' glm (or glm4_moe, is_glm4_moe) cannot express this model (empty when it can)."""
    if is_glm4_moe(config):
        return hf_moe.unsupported(config)
    expected = {"position_embedding": "rope_1d", "rotary_pairing": "interleaved", "norm": "pre_ln",
                "normalization": "rmsnorm", "mlp": "swiglu", "add_bias_linear": False}
    return [f"model.{key}={getattr(config, key)!r} (glm has {value!r})" for key, value in expected.items()
            if getattr(config, key) != value]


def check_hf_exportable(config: ModelConfig) -> None:
    """Raise CheckpointError in one line when transformers has no class for the model."""
    reasons = hf_unsupported(config)
    if reasons:
        raise CheckpointError("transformers has no model class for this GLM (GLM-2021, GLM-130B and ChatGLM-6B are "
                              "not its glm or glm4_moe type): " + ", ".join(reasons) + "; export it with --format glm "
                              "instead")


def hf_config(config: ModelConfig, dtype: torch.dtype, special_ids: dict[str, object]) -> dict:
    """transformers' glm config.json of the model; special_ids: pad/bos/eos_token_id (None when unknown)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_base, "partial_rotary_factor": config.rotary_fraction}
    return {"architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "intermediate_size": config.ffn_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
            "max_position_embeddings": config.max_sequence_length, "rms_norm_eps": config.layernorm_epsilon,
            "attention_bias": config.add_qkv_bias, "attention_dropout": config.attention_dropout,
            "tie_word_embeddings": config.tie_word_embeddings, "initializer_range": config.init_std,
            "rope_parameters": rope, "partial_rotary_factor": config.rotary_fraction, "rope_theta": config.rope_base,
            "dtype": str(dtype).removeprefix("torch."), "use_cache": True, **special_ids}


def hf_tensors(canonical: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical weights -> transformers' glm names (q, k, v split), in the model's order."""
    ours_to_glm = {ours: theirs for theirs, ours in GLM_TOP_LEVEL.items()}
    tensors = {"model.embed_tokens.weight": canonical[WORD_EMBEDDINGS]}
    for i in range(config.num_layers):
        source, target = f"transformer.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if config.add_qkv_bias else ("weight",):
            parts = canonical[f"{source}attention.query_key_value.{kind}"].split(config.qkv_rows, dim=0)
            tensors.update({f"{target}self_attn.{proj}.{kind}": part for proj, part in zip(QKV, parts)})
        tensors.update({target + theirs: canonical[source + ours] for theirs, ours in GLM_LAYER.items()})
    tensors["model.norm.weight"] = canonical["transformer.final_layernorm.weight"]
    if not config.tie_word_embeddings:
        tensors[ours_to_glm[OUTPUT_WEIGHT]] = canonical[OUTPUT_WEIGHT]
    return tensors


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> int:
    """model.safetensors, or (above max_shard_bytes) shards in order plus model.safetensors.index.json;
    returns the number of files holding weights."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / WEIGHTS), metadata={"format": "pt"})
        give_default_mode(out_dir / WEIGHTS)  # safetensors creates its files 0600
        return 1
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        give_default_mode(out_dir / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return len(shards)


def special_ids(tokenizer: Optional[Path]) -> dict[str, object]:
    """config.json's pad/bos/eos_token_id from the run's tokenizer: padding <|endoftext|>, generation stopping at
    its stop_ids (<|endoftext|>, the end of a piece, the role tokens); None each without a tokenizer."""
    if tokenizer is None:
        return {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    loaded = load_tokenizer(tokenizer)
    return {"pad_token_id": loaded.pad_id, "bos_token_id": None, "eos_token_id": list(loaded.stop_ids)}


def write_tokenizer_files(tokenizer: Path, config: ModelConfig, out_dir: Path) -> None:
    """tokenizer.json, the run's with GLM-4's prefix as its post-processor (encoding with special tokens, as
    transformers does by default, opens every text with [gMASK] <sop>, the layout the model trained on: GLM-4's
    own tokenizer does the same), and tokenizer_config.json for PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    ours, backend = load_tokenizer(tokenizer), Tokenizer.from_file(str(tokenizer))
    gmask, sop = backend.id_to_token(ours.gmask_id), backend.id_to_token(ours.sop_id)
    backend.post_processor = TemplateProcessing(single=f"{gmask} {sop} $A", pair=f"{gmask} {sop} $A $B",
                                                special_tokens=[(gmask, ours.gmask_id), (sop, ours.sop_id)])
    backend.save(str(out_dir / TOKENIZER))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_sequence_length,
                "eos_token": EOT, "pad_token": EOT, "clean_up_tokenization_spaces": False}
    (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=1))


def write_hf(canonical: dict[str, torch.Tensor], config: ModelConfig, out_dir: Path, tokenizer: Optional[Path] = None,
             dtype: torch.dtype = torch.float32, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> int:
    """A transformers glm directory: config.json, the weights (sharded above max_shard_bytes),
    generation_config.json and, given the run's tokenizer, tokenizer.json + tokenizer_config.json.
    Refuses (before writing anything) a model transformers cannot express. Returns the weight files written."""
    check_hf_exportable(config)
    if tokenizer is not None and not tokenizer.is_file():
        raise CheckpointError(f"tokenizer {tokenizer} does not exist: pass the tokenizer.json the run used")
    ids = special_ids(tokenizer)  # a tokenizer without the special tokens is refused before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, config, out_dir)
    if is_glm4_moe(config):
        tensors = {name: value if name.endswith(hf_moe.FP32_SUFFIXES) else value.to(dtype)  # the router stays fp32
                   for name, value in hf_moe.glm4_moe_tensors(canonical, config).items()}
        meta = hf_moe.glm4_moe_config(config, dtype, ids)
    else:
        tensors = {name: value.to(dtype) for name, value in hf_tensors(canonical, config).items()}
        meta = hf_config(config, dtype, ids)
    files = write_safetensors(tensors, out_dir, max_shard_bytes)
    (out_dir / CONFIG).write_text(json.dumps(meta, indent=1))
    generation = {"do_sample": False, **ids}
    (out_dir / GENERATION_CONFIG).write_text(json.dumps(generation, indent=1))
    return files
