"""Self-describing runs: a run directory holds its resolved config and tokenizer, each checkpoint its model
config, layout and tokenizer fingerprint, so the offline tools take a run directory with no --config; a
--config of another shape, a tokenizer that is not the run's, and a fresh run into the directory of an earlier
one are refused in one line, with nothing written."""
import dataclasses
import json
import shutil

import pytest

from tests.glm_processes import REPO, TINY, metrics, run_train, train_args
from trainer.tools.ckpt import main as glm_ckpt
from trainer.checkpoint.export import read_export
from trainer.checkpoint.run_record import sha256
from trainer.config import load_config
from trainer.data.dataset import resolve_paths
from trainer.tools.generate import main as glm_generate
from trainer.tools.preflight import check_data
from trainer.train import main as glm_train

OVERRIDES = ["train.save_interval=1"]
PROMPT = ["--text", "The [MASK] of the module.", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("described") / "run"
    result = run_train(train_args(run_dir, 2, *OVERRIDES))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _one_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_the_run_dir_and_its_checkpoints_describe_the_run(run_dir):
    args = train_args(run_dir, 2, *OVERRIDES)
    given = load_config(args[1], args[3::2])
    resolved = check_data(given)
    assert given.model.vocab_size == 0 and resolved.model.vocab_size == 4096  # resolved without mutation
    assert load_config(run_dir / "config.yaml") == resolved
    assert (run_dir / "tokenizer.json").read_bytes() == resolve_paths(resolved.data)[1].read_bytes()
    for step in (1, 2):
        record = json.loads((run_dir / "checkpoints" / f"global_step{step}" / "run.json").read_text())
        assert record == {"model": dataclasses.asdict(resolved.model), "layout": {"tp": 1, "pp": 1, "dp": 1},
                          "tokenizer_sha256": sha256(run_dir / "tokenizer.json")}


def test_generate_and_export_take_the_run_dir_without_a_config(run_dir, tmp_path, capsys):
    assert glm_generate([str(run_dir), *PROMPT]) == 0
    filled = capsys.readouterr().out
    for source in (run_dir / "checkpoints", run_dir / "checkpoints" / "global_step2"):
        assert glm_generate([str(source), *PROMPT]) == 0
        assert capsys.readouterr().out == filled
    assert glm_generate([str(run_dir), *PROMPT, "--config", str(run_dir / "config.yaml")]) == 0
    assert capsys.readouterr().out == filled
    assert glm_ckpt(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'export'}")
    config, _ = read_export(tmp_path / "export")
    assert config == load_config(run_dir / "config.yaml").model
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
    assert glm_generate([str(tmp_path / "export"), *PROMPT]) == 0
    assert capsys.readouterr().out == filled


@pytest.mark.parametrize("change, named", [
    (["model.hidden_size=64"], "model.hidden_size: checkpoint 32, this run 64"),
    (["model.num_layers=3"], "model.num_layers: checkpoint 2, this run 3"),
    (["model.vocab_size=5000"], "model.vocab_size: checkpoint 4096, this run 5000"),
])
def test_a_config_of_another_shape_is_refused_naming_the_keys(run_dir, tmp_path, capsys, change, named):
    config = ["--config", str(REPO / "configs" / "glm-debug.yaml")]
    for item in TINY + change:
        config += ["--set", item]
    assert glm_generate([str(run_dir), *PROMPT, *config]) == 2
    assert named in _one_error(capsys)
    assert glm_ckpt(["export", str(run_dir), "--out", str(tmp_path / "export"), *config]) == 2
    assert named in _one_error(capsys) and not (tmp_path / "export").exists()


def test_a_tokenizer_that_is_not_the_runs_is_refused(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace("[MASK]", "[MASQ]"))
    assert glm_generate([str(copy), *PROMPT]) == 2
    assert "is not the tokenizer global_step2 was trained with" in _one_error(capsys)


def test_a_fresh_run_into_an_earlier_run_is_refused_unless_told_what_to_do(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    assert glm_train(train_args(copy, 1)) == 2
    message = _one_error(capsys)
    assert "holds an earlier run (metrics.jsonl and checkpoints)" in message and "train.overwrite=true" in message
    assert glm_train(train_args(copy, 1, "train.resume=true", "train.overwrite=true")) == 2
    assert "not both" in _one_error(capsys)
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before
    result = run_train(train_args(copy, 1, "train.overwrite=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["global_step1", "latest"]
    assert [r["step"] for r in metrics(copy)] == [1]
    assert load_config(copy / "config.yaml").train.overwrite is False  # reusing it never deletes the run
