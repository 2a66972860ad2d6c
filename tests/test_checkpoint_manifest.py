"""Checkpoint manifests (trainer/checkpoint/manifest.py): a complete directory verifies; a missing, truncated
or altered file is named; and the offline tools refuse a checkpoint whose manifest fails, in one line."""
import pytest

from tests.test_checkpoint_export import _model_and_weights
from trainer.tools.ckpt import main as glm_ckpt
from trainer.checkpoint.convert import convert_checkpoint
from trainer.checkpoint.export import write_export
from trainer.checkpoint.manifest import verify, write_manifest


def _directory(tmp_path):
    directory = tmp_path / "global_step3"
    (directory / "rng").mkdir(parents=True)
    (directory / "a.pt").write_bytes(b"0123456789")
    (directory / "rng" / "rank0.pt").write_bytes(b"abc")
    write_manifest(directory)
    return directory


def test_a_complete_directory_verifies(tmp_path):
    assert verify(_directory(tmp_path)) is None


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / "a.pt").unlink(), "a.pt is missing"),
    (lambda d: (d / "a.pt").write_bytes(b"01234"), "a.pt has 5 bytes, expected 10"),
    (lambda d: (d / "rng" / "rank0.pt").write_bytes(b"abd"), "rng/rank0.pt fails its CRC-32 check"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest"),
    (lambda d: (d / "manifest.json").write_text("{"), "unreadable manifest"),
    # valid JSON of the wrong shape, as a crash or a hand edit may leave: the same fallback, no TypeError
    (lambda d: (d / "manifest.json").write_text("[]"), "unreadable manifest"),
    (lambda d: (d / "manifest.json").write_text('{"files": []}'), "unreadable manifest"),
    (lambda d: (d / "manifest.json").write_text('{"files": {"a.pt": 10}}'), "unreadable manifest"),
    (lambda d: (d / "manifest.json").write_text('{"files": {"a.pt": {"size": "10", "crc32": 1}}}'),
     "unreadable manifest"),
    (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe"), "unreadable manifest"),
])
def test_damage_is_named(tmp_path, damage, problem):
    directory = _directory(tmp_path)
    damage(directory)
    assert problem in verify(directory)


def test_offline_tools_refuse_a_checkpoint_whose_manifest_fails(tmp_path, capsys):
    config, _, weights = _model_and_weights()
    write_export(weights, config, tmp_path / "export")
    tag_dir = convert_checkpoint(tmp_path / "export", None, 1, 1, tmp_path / "checkpoints")
    layer = sorted(tag_dir.glob("layer_*-model_states.pt"))[1]
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    layer.write_bytes(bytes(data))
    overrides = [x for item in ("model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                f"model.vocab_size={config.vocab_size}", "model.max_sequence_length=16",
                                "model.mlp=geglu") for x in ("--set", item)]
    assert glm_ckpt(["export", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "out"),
                     "--config", "configs/glm-debug.yaml", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is corrupted" in err[0] and f"{layer.name} fails its CRC-32 check" in err[0], err
    assert not (tmp_path / "out").exists()
