"""The transformers bridge: a random tiny GlmForCausalLM (2 key/value heads, rotary on half of each head,
biases and norm gains perturbed away from their init) imported gives transformers' logits (fp32, 1e-5), also
at tp=2; exported back (sharded too) transformers loads it and gives the original's logits; greedy generation
equals transformers' generate; ChatGLM2/3's names import to the same weights; ChatGLM-6B's release names and
per-head q/k/v import to weights whose attention is the release's formula; GLM-2021 is refused."""
import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.testing import assert_close

from tests.distributed import run_distributed
from trainer.checkpoint import hf
from trainer.tools import ckpt as cli
from trainer.checkpoint.export import write_export
from trainer.checkpoint.layout import merge_states
from trainer.checkpoint.model_source import build_model, read_weights
from trainer.errors import CheckpointError
from trainer.tools.decoding import continue_causal
from trainer.model.config import ModelConfig
from trainer.model.glm import GLMModel
from trainer.model.mask import segments_of_sep
from trainer.model.rotary import position_rotations
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


CHATGLM_6B = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "bos_token_id": 130004,
              "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3,
              "hidden_size": 4096, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05,
              "max_sequence_length": 2048, "num_attention_heads": 32, "num_layers": 28, "position_encoding_2d": True,
              "torch_dtype": "float16", "use_cache": True, "vocab_size": 130528}
"""THUDM/chatglm-6b's config.json keys and values (GLM-SPEC section 6's shape)."""


def test_chatglm_6b_config_is_the_configs_model():
    from trainer.config import load_config

    ours, theirs = hf.chatglm_6b_model_config(CHATGLM_6B), load_config("configs/chatglm-6b.yaml").model
    assert ours.shape() == theirs.shape()
    switches = ("position_embedding", "rotary_pairing", "norm", "normalization", "mlp", "layernorm_epsilon")
    assert [getattr(ours, key) for key in switches] == [getattr(theirs, key) for key in switches]


def _release_attention(tensors: dict, x, positions, blocks, mask, heads: int, layer: int):
    """ChatGLM-6B's attention of block `layer` (0-based) as the release computes it, from its own tensors:
    [b, s, n, 3 d] per head, split into q, k, v; the first half of each head rotated by position and the second
    by block position (rotate_half pairs); q / (sqrt(d) c), scores * c in fp32, c = layer + 1."""
    prefix = f"transformer.layers.{layer}.attention."
    b, s, h = x.shape
    d = h // heads
    mixed = (x @ tensors[prefix + "query_key_value.weight"].T + tensors[prefix + "query_key_value.bias"])
    q, k, v = mixed.view(b, s, heads, 3 * d).split(d, dim=-1)  # [b, s, n, d] each

    def rotate(t, ids):  # t [b, s, n, r]; cos/sin of cat(freqs, freqs), rotate_half(t) = cat(-t2, t1)
        r = t.shape[-1]
        freqs = ids[..., None].float() * 10000.0 ** (-torch.arange(0, r, 2).float() / r)  # [b, s, r/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]  # [b, s, 1, r]
        t1, t2 = t.chunk(2, dim=-1)
        return t * emb.cos() + torch.cat([-t2, t1], dim=-1) * emb.sin()

    q, k = (torch.cat([rotate(t.chunk(2, -1)[0], positions), rotate(t.chunk(2, -1)[1], blocks)], -1) for t in (q, k))
    c = layer + 1
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, n, s, d]
    scores = (q / (d ** 0.5 * c)) @ k.transpose(-1, -2)
    scores = (scores.masked_fill(~mask, -10000.0).float() * c).softmax(-1)
    context = (scores @ v).transpose(1, 2).reshape(b, s, h)  # [b, s, h]
    return context @ tensors[prefix + "dense.weight"].T + tensors[prefix + "dense.bias"]


def test_chatglm_6b_release_names_import_to_weights_that_compute_the_release_attention(tmp_path, capsys):
    meta = {**CHATGLM_6B, "hidden_size": 32, "inner_hidden_size": 64, "num_attention_heads": 4, "num_layers": 2,
            "vocab_size": 100, "max_sequence_length": 16}
    config = hf.chatglm_6b_model_config(meta)
    generator = torch.Generator().manual_seed(0)
    canonical = {name: torch.randn(value.shape, generator=generator) * 0.3
                 for name, value in merge_states([GLMModel(config).state_dict()], config).items()}
    release = {"lm_head.weight": canonical["embedding.word_embeddings.weight"].clone()}
    for name, value in canonical.items():
        if name.endswith("attention.query_key_value.weight") or name.endswith("attention.query_key_value.bias"):
            q, k, v = value.chunk(3)  # ours: [all q; all k; all v]; the release: each head's q, k, v together
            value = torch.cat([part[i * 8:(i + 1) * 8] for i in range(4) for part in (q, k, v)])
        release["transformer.word_embeddings.weight" if name.startswith("embedding.") else name] = value
    for layer in range(2):
        release[f"transformer.layers.{layer}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(release, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(meta))
    imported_config, imported = read_weights(tmp_path, None)
    assert imported_config == config and imported.keys() == canonical.keys()
    assert all(torch.equal(imported[name], value) for name, value in canonical.items())

    model = build_model(config, imported)
    x = torch.randn(2, 9, 32, generator=generator)
    sep = torch.tensor([4, 6])
    index = torch.arange(9).expand(2, 9)
    positions = torch.where(index >= sep[:, None], sep[:, None] - 1, index)  # Part B at the [gMASK]'s position
    blocks = torch.where(index >= sep[:, None], index - sep[:, None] + 1, 0)
    mask = ((index[:, None, :] < sep[:, None, None]) | (index[:, None, :] <= index[:, :, None]))[:, None]
    for layer in range(2):
        ours = model.transformer["layers"][layer].attention(x, position_rotations(positions, blocks, config), mask)
        assert_close(ours, _release_attention(release, x, positions, blocks, mask, 4, layer), atol=1e-5, rtol=1e-5)

    release["lm_head.weight"] = release["lm_head.weight"] + 1
    save_file(release, str(tmp_path / "model.safetensors"))
    assert cli.main(["import-hf", str(tmp_path), "--out", str(tmp_path.with_name(tmp_path.name + "-out"))]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "lm_head.weight differs from transformer.word_embeddings.weight" in error[0]
