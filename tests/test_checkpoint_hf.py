"""The transformers bridge: a random tiny GlmForCausalLM (2 key/value heads, rotary on half of each head,
biases and norm gains perturbed away from their init) imported gives transformers' logits (fp32, 1e-5), also
at tp=2; exported back (sharded too) transformers loads it and gives the original's logits; greedy generation
equals transformers' generate; ChatGLM2/3's names import to the same weights; GLM-2021 is refused."""
import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.testing import assert_close

from tests.distributed import run_distributed
from trainer.checkpoint import cli, hf
from trainer.checkpoint.export import write_export
from trainer.checkpoint.layout import merge_states
from trainer.checkpoint.model_source import build_model, read_weights
from trainer.errors import CheckpointError
from trainer.decoding import continue_causal
from trainer.model.config import ModelConfig
from trainer.model.glm import GLMModel
from trainer.model.mask import segments_of_sep
from trainer.parallel.topology import Topology

transformers = pytest.importorskip("transformers")
VOCAB, SEQ = 160, 12


def causal_inputs(input_ids: torch.Tensor):
    """The trainer's inputs for a causal sequence: positions 0..s-1, block positions 0, Part A of one token."""
    b, s = input_ids.shape
    positions = torch.arange(s).expand(b, s)
    return input_ids, positions, torch.zeros_like(positions), segments_of_sep(torch.ones(b, dtype=torch.long), s)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(directory, model): a random GlmForCausalLM saved with save_pretrained."""
    config = transformers.GlmConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
        tie_word_embeddings=False, attention_bias=True, partial_rotary_factor=0.5, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.GlmForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
    directory = tmp_path_factory.mktemp("hf") / "glm-tiny"
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def test_imported_model_gives_transformers_logits(hf_model, input_ids):
    directory, model = hf_model
    config, weights = read_weights(directory, None)
    assert (config.num_kv_heads, config.rotary_dim, config.tie_word_embeddings) == (2, 4, False)
    ours = build_model(config, weights)(*causal_inputs(input_ids))[..., :VOCAB]
    assert_close(ours, model(input_ids).logits, atol=1e-5, rtol=1e-5)


def _tp2_logits(rank, world_size, directory, input_ids, expected):
    group = Topology.create(tp=2, pp=1).tp_group
    config, weights = read_weights(directory, None)
    shard = build_model(config, weights, group)(*causal_inputs(input_ids))  # [b, s, V_pad / 2]
    shards = [torch.empty_like(shard) for _ in range(world_size)]
    dist.all_gather(shards, shard.contiguous(), group=group)
    assert_close(torch.cat(shards, dim=-1)[..., :VOCAB], expected, atol=1e-5, rtol=1e-5)


def test_imported_model_at_tp2_gives_transformers_logits(hf_model, input_ids):
    directory, model = hf_model
    with torch.no_grad():
        expected = model(input_ids).logits
    run_distributed(_tp2_logits, 2, directory, input_ids, expected)


@pytest.mark.parametrize("max_shard_bytes", [hf.DEFAULT_MAX_SHARD_BYTES, 40_000], ids=["one_file", "sharded"])
def test_exported_model_loads_in_transformers_with_the_same_logits(hf_model, input_ids, tmp_path, max_shard_bytes):
    directory, model = hf_model
    config, weights = read_weights(directory, None)
    files = hf.write_hf(weights, config, tmp_path / "out", max_shard_bytes=max_shard_bytes)
    assert (files > 1) == (max_shard_bytes < hf.DEFAULT_MAX_SHARD_BYTES)
    assert (tmp_path / "out" / hf.INDEX).is_file() == (files > 1)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "GlmForCausalLM"
    assert_close(reloaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)
    _, again = read_weights(tmp_path / "out", None)
    assert all(torch.equal(again[name], value) for name, value in weights.items())


def test_greedy_generation_equals_transformers_generate(hf_model, input_ids):
    directory, model = hf_model
    config, weights = read_weights(directory, None)
    prompt = input_ids[:1, :5]
    theirs = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)[0, 5:].tolist()
    ours = continue_causal(build_model(config, weights), prompt[0].tolist(), config.max_sequence_length, VOCAB, 20)
    assert len(theirs) == 20 and ours == theirs


def test_chatglm_names_import_to_the_same_weights(hf_model, tmp_path):
    directory, _ = hf_model
    config, weights = read_weights(directory, None)
    renamed = {"transformer.embedding.word_embeddings.weight": weights["embedding.word_embeddings.weight"],
               "transformer.encoder.final_layernorm.weight": weights["transformer.final_layernorm.weight"],
               "transformer.output_layer.weight": weights["output_layer.weight"],
               "transformer.rotary_pos_emb.inv_freq": torch.ones(2)}
    for name, value in weights.items():
        if name.startswith("transformer.layers."):
            renamed[name.replace("transformer.layers.", "transformer.encoder.layers.")
                        .replace(".attention.", ".self_attention.")] = value
    save_file(renamed, str(tmp_path / "model.safetensors"))
    chatglm = {"model_type": "chatglm", "num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 48, "kv_channels": 8,
               "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2,
               "padded_vocab_size": VOCAB, "seq_length": 64, "layernorm_epsilon": 1e-5, "rmsnorm": True,
               "add_bias_linear": False, "add_qkv_bias": True, "apply_residual_connection_post_layernorm": False}
    (tmp_path / "config.json").write_text(json.dumps(chatglm))
    imported_config, imported = read_weights(tmp_path, None)
    assert imported_config == config
    assert imported.keys() == weights.keys()
    assert all(torch.equal(imported[name], value) for name, value in weights.items())


def test_glm_2021_is_refused_in_one_line(tmp_path, capsys):
    config = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=50, max_sequence_length=8)
    canonical = merge_states([GLMModel(config).state_dict()], config)
    with pytest.raises(CheckpointError, match="transformers has no model class"):
        hf.write_hf(canonical, config, tmp_path / "never")
    write_export(canonical, config, tmp_path / "export")
    assert cli.main(["export", str(tmp_path / "export"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: transformers has no model class")
    assert "model.position_embedding='learned_2d'" in error[0] and "model.mlp='gelu'" in error[0]
    assert not (tmp_path / "hf").exists() and not (tmp_path / "never").exists()
