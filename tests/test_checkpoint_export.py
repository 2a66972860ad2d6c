"""glm-ckpt export: one safetensors file + config.json + tokenizer.json that reloads to identical logits,
and the round trip export -> training checkpoint (convert) -> export."""
import json

import torch

from tests.checkpoint_helpers import VOCAB, glm_inputs, perturb_, tiny_config
from trainer.tools.ckpt import main as glm_ckpt
from trainer.checkpoint.convert import convert_checkpoint
from trainer.checkpoint.export import read_export, write_export
from trainer.checkpoint.manifest import write_manifest
from trainer.checkpoint.model_source import build_model, read_weights
from trainer.model import GLMModel


def _model_and_weights():
    config = tiny_config().model
    model = GLMModel(config, seed=7).eval()
    perturb_(model.named_parameters(), config, tp_rank=0)
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    weights["embedding.word_embeddings.weight"] = weights["embedding.word_embeddings.weight"][:VOCAB]
    return config, model, weights


def test_export_then_reload_gives_identical_logits(tmp_path):
    torch.set_num_threads(1)
    config, model, weights = _model_and_weights()
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text('{"model": {}}')
    write_export(weights, config, tmp_path / "export", tokenizer)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors",
                                                                       "tokenizer.json"]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model"]["mlp"] == "geglu"
    loaded_config, loaded = read_export(tmp_path / "export")
    assert loaded_config == config
    with torch.no_grad():
        expected = model(*glm_inputs())
        actual = build_model(loaded_config, loaded)(*glm_inputs())
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_export_to_checkpoint_and_back_through_the_cli(tmp_path):
    config, model, weights = _model_and_weights()
    write_export(weights, config, tmp_path / "export")
    convert_checkpoint(tmp_path / "export", None, 2, 1, tmp_path / "checkpoints")  # a tp=2 training checkpoint
    overrides = [x for item in ("model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                f"model.vocab_size={VOCAB}", "model.max_sequence_length=16", "model.mlp=geglu")
                 for x in ("--set", item)]
    assert glm_ckpt(["export", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "again"),
                     "--config", "configs/glm-debug.yaml", *overrides]) == 0
    again_config, again = read_weights(tmp_path / "again", None)
    with torch.no_grad():
        torch.testing.assert_close(build_model(again_config, again)(*glm_inputs()), model(*glm_inputs()),
                                   rtol=0, atol=0)


def test_bf16_export_and_a_checkpoint_without_its_model_needs_the_config(tmp_path, capsys):
    config, _, weights = _model_and_weights()
    write_export(weights, config, tmp_path / "export", dtype=torch.bfloat16)
    _, loaded = read_export(tmp_path / "export")
    torch.testing.assert_close(loaded["transformer.layers.0.attention.dense.weight"],
                               weights["transformer.layers.0.attention.dense.weight"].bfloat16().float(), rtol=0, atol=0)
    tag_dir = convert_checkpoint(tmp_path / "export", None, 1, 1, tmp_path / "checkpoints")
    assert glm_ckpt(["export", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "x")]) == 0  # run.json
    assert read_export(tmp_path / "x")[0] == config
    (tag_dir / "run.json").unlink()  # a checkpoint saved before run.json recorded the model: --config is needed
    write_manifest(tag_dir)
    assert glm_ckpt(["export", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--config" in err[0] and not (tmp_path / "y").exists()
