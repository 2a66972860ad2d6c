"""Import of THUDM/GLM release checkpoints: a two-way model-parallel release built here with THUDM/GLM's
parameter names and per-rank shapes (GLM-SPEC section 2) imports to a model with the original logits."""
import dataclasses
import re

import pytest
import torch
import yaml

from tests.checkpoint_helpers import VOCAB, glm_inputs, perturb_
from trainer.tools.ckpt import main as glm_ckpt
from trainer.checkpoint.model_source import build_model, read_weights
from trainer.checkpoint.thudm import read_release
from trainer.errors import ConfigError
from trainer.model import GLMModel
from trainer.model.config import ModelConfig

# Released GLMs use 64-wide heads: h=128 is two of them, so the shape can be inferred from the tensors.
CONFIG = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=2, vocab_size=VOCAB, max_sequence_length=16,
                     hidden_dropout=0.0, attention_dropout=0.0)


def thudm_rank_state(full: dict, rank: int, p: int) -> dict:
    """Rank `rank` of p of a THUDM/GLM release, from full tensors, by the reference code's rules."""
    state = {"word_embeddings.weight": full["embedding.word_embeddings.weight"][:VOCAB].chunk(p)[rank],
             "transformer.position_embeddings.weight": full["embedding.position_embeddings.weight"],
             "transformer.block_position_embeddings.weight": full["embedding.block_position_embeddings.weight"],
             "transformer.final_layernorm.weight": full["transformer.final_layernorm.weight"],
             "transformer.final_layernorm.bias": full["transformer.final_layernorm.bias"]}
    for i in range(CONFIG.num_layers):
        prefix = f"transformer.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = full[f"{prefix}attention.query_key_value.{kind}"].chunk(3)
            state[f"{prefix}attention.query_key_value.{kind}"] = torch.cat([t.chunk(p)[rank] for t in (q, k, v)])
            state[f"{prefix}mlp.dense_h_to_4h.{kind}"] = full[f"{prefix}mlp.dense_h_to_4h.{kind}"].chunk(p)[rank]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                state[f"{prefix}{norm}.{kind}"] = full[f"{prefix}{norm}.{kind}"]
        for name in ("attention.dense", "mlp.dense_4h_to_h"):
            state[f"{prefix}{name}.weight"] = full[f"{prefix}{name}.weight"].chunk(p, dim=1)[rank]
            state[f"{prefix}{name}.bias"] = full[f"{prefix}{name}.bias"]
    return state


def _release(tmp_path, p: int = 2, config: ModelConfig = CONFIG):
    model = GLMModel(config, seed=3).eval()
    perturb_(model.named_parameters(), config, tp_rank=0)
    full = model.state_dict()
    root = tmp_path / "glm-release"
    (root / "250000").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("250000")
    for rank in range(p):
        torch.save({"module": thudm_rank_state(full, rank, p), "iteration": 250000},
                   root / "250000" / f"mp_rank_{rank:02d}_model_states.pt")
    return model, root


def test_two_rank_release_imports_to_the_same_logits(tmp_path):
    torch.set_num_threads(1)
    model, root = _release(tmp_path)
    config, weights = read_release(root)
    shape = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length", "ffn_size", "mlp")
    assert [getattr(config, k) for k in shape] == [getattr(CONFIG, k) for k in shape]  # inferred from the tensors
    with torch.no_grad():
        torch.testing.assert_close(build_model(config, weights)(*glm_inputs()), model(*glm_inputs()), rtol=0, atol=1e-6)


def test_import_thudm_cli_writes_an_export(tmp_path, capsys):
    model, root = _release(tmp_path)
    assert glm_ckpt(["import-thudm", str(root), "--out", str(tmp_path / "export")]) == 0
    config, weights = read_weights(tmp_path / "export", None)
    with torch.no_grad():
        torch.testing.assert_close(build_model(config, weights)(*glm_inputs()), model(*glm_inputs()), rtol=0, atol=1e-6)
    assert glm_ckpt(["import-thudm", str(root / "250000"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("change, named", [
    ({"vocab_size": 4096}, "embedding.word_embeddings.weight is [300, 128], the config needs [4096, 128]"),
    ({"max_sequence_length": 32}, "embedding.position_embeddings.weight is [16, 128], the config needs [32, 128]"),
    ({"num_layers": 3}, "transformer.layers.2.input_layernorm.weight missing"),
    ({"ffn_hidden_size": 256}, "mlp.dense_h_to_4h.weight is [512, 128], the config needs [256, 128]"),
    ({"mlp": "geglu"}, "mlp.dense_h_to_4h.weight is [512, 128], the config needs"),
    ({"position_embedding": "rope_1d"}, "embedding.position_embeddings.weight unexpected"),
    ({"norm": "deepnorm"}, "THUDM/GLM's code builds model.norm=pre_ln"),
])
def test_a_config_that_does_not_match_the_tensors_is_refused(tmp_path, change, named):
    _, root = _release(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(named)):
        read_release(root, dataclasses.replace(CONFIG, **change))


def test_import_under_a_mismatched_config_writes_nothing(tmp_path, capsys):
    _, root = _release(tmp_path)
    config = tmp_path / "wrong.yaml"
    config.write_text(yaml.safe_dump({"model": {**{k: getattr(CONFIG, k) for k in (
        "num_layers", "hidden_size", "num_attention_heads", "max_sequence_length")}, "vocab_size": 4096}}))
    assert glm_ckpt(["import-thudm", str(root), "--out", str(tmp_path / "export"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config does not match the release" in err[0] and "[4096, 128]" in err[0], err
    assert not (tmp_path / "export").exists()


def test_a_config_sets_the_head_width_the_tensors_cannot_show(tmp_path, capsys):
    """A GLM trained with THUDM's code at 16-wide heads (8 heads of h=128): the tensors are those of 2 heads of
    64, so only the --config's head count gives the model's logits; without it 64-wide heads are assumed."""
    torch.set_num_threads(1)
    narrow = dataclasses.replace(CONFIG, num_attention_heads=8)
    model, root = _release(tmp_path, config=narrow)
    config = tmp_path / "narrow.yaml"
    config.write_text(yaml.safe_dump({"model": {k: getattr(narrow, k) for k in (
        "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length")}}))
    assert glm_ckpt(["import-thudm", str(root), "--out", str(tmp_path / "export"), "--config", str(config)]) == 0
    assert "8 heads" in capsys.readouterr().out
    imported, weights = read_weights(tmp_path / "export", None)
    assert imported.head_dim == 16
    with torch.no_grad():
        expected = model(*glm_inputs())
        torch.testing.assert_close(build_model(imported, weights)(*glm_inputs()), expected, rtol=0, atol=1e-6)
        assumed, weights = read_release(root)
        assert assumed.head_dim == 64
        assert not torch.allclose(build_model(assumed, weights)(*glm_inputs()), expected, atol=1e-3)
