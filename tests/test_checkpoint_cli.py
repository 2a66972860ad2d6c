"""glm-ckpt's outputs: never into or over their source (one error line, exit 2, every source byte unchanged),
never over an earlier output, and published whole (a write that fails leaves nothing under --out)."""
import hashlib
from pathlib import Path

import pytest

from tests.checkpoint_helpers import VOCAB, tiny_config
from trainer.tools.ckpt import main as glm_ckpt
from trainer.checkpoint.convert import convert_checkpoint
from trainer.checkpoint.export import write_export
from trainer.model import GLMModel


def _run(tmp_path: Path) -> Path:
    """A run directory holding one tp=1 training checkpoint (global_step0) of a tiny model."""
    config = tiny_config().model
    weights = GLMModel(config, seed=7).state_dict()
    weights["embedding.word_embeddings.weight"] = weights["embedding.word_embeddings.weight"][:VOCAB]
    write_export(weights, config, tmp_path / "export")
    convert_checkpoint(tmp_path / "export", None, 1, 1, tmp_path / "run" / "checkpoints")
    return tmp_path / "run"


def _contents(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command, source, out, words", [
    (["convert", "--to-tp", "2", "--to-pp", "1"], "run", "run/checkpoints", "is inside the source"),
    (["convert", "--to-tp", "1", "--to-pp", "1"], "run/checkpoints/global_step0", "run/checkpoints",
     "holds the source"),
    (["convert", "--to-tp", "1", "--to-pp", "1"], "run/checkpoints", "run/checkpoints", "is the source itself"),
    (["export"], "run", "run", "is the source itself"),
    (["export"], "run", "run/export", "is inside the source"),
    (["export", "--format", "hf"], "run/checkpoints", "run/checkpoints/hf", "is inside the source"),
])
def test_an_output_into_or_over_its_source_is_refused_and_the_source_is_untouched(tmp_path, capsys, command,
                                                                                  source, out, words):
    run = _run(tmp_path)
    before = _contents(run)
    argv = [command[0], str(tmp_path / source), "--out", str(tmp_path / out), *command[1:]]
    assert glm_ckpt(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out ") and words in err[0], err
    assert _contents(run) == before


def test_a_symbolic_link_to_the_source_is_the_source(tmp_path, capsys):
    run = _run(tmp_path)
    (tmp_path / "link").symlink_to(run / "checkpoints")
    before = _contents(run)
    assert glm_ckpt(["convert", str(run), "--to-tp", "1", "--to-pp", "1", "--out", str(tmp_path / "link")]) == 2
    assert "is inside the source" in capsys.readouterr().err
    assert _contents(run) == before


def test_an_output_never_replaces_an_earlier_one(tmp_path, capsys):
    run = _run(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert glm_ckpt(["export", str(run), "--out", str(tmp_path / "taken")]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()  # an empty directory is taken
    assert glm_ckpt(["export", str(run), "--out", str(tmp_path / "empty")]) == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["config.json", "model.safetensors"]
    other = tmp_path / "other" / "checkpoints"
    assert glm_ckpt(["convert", str(run), "--to-tp", "1", "--to-pp", "1", "--out", str(other)]) == 0
    before = _contents(other)
    assert glm_ckpt(["convert", str(run), "--to-tp", "2", "--to-pp", "1", "--out", str(other)]) == 2
    assert "global_step0 already exists" in capsys.readouterr().err
    assert _contents(other) == before


def test_an_export_that_fails_while_writing_leaves_nothing(tmp_path, monkeypatch):
    run = _run(tmp_path)
    (run / "tokenizer.json").write_text('{"model": {}}')

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trainer.checkpoint.export.shutil.copyfile", disk_full)  # after the weights are written
    with pytest.raises(OSError):
        glm_ckpt(["export", str(run), "--out", str(tmp_path / "new" / "export"), "--tokenizer",
                  str(run / "tokenizer.json")])
    assert not (tmp_path / "new").exists()


def test_a_conversion_that_fails_while_writing_leaves_the_checkpoints_as_they_were(tmp_path, monkeypatch):
    run = _run(tmp_path)
    out = tmp_path / "ft" / "checkpoints"
    out.mkdir(parents=True)
    (out / "latest").write_text("global_step7")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trainer.checkpoint.convert.write_manifest", disk_full)  # the last file of the tag
    with pytest.raises(OSError):
        glm_ckpt(["convert", str(run), "--to-tp", "1", "--to-pp", "1", "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["latest"] and (out / "latest").read_text() == "global_step7"
