"""trainer/tools/preflight.py, function by function: the vocabulary resolved into a new config (the given one is
left as it was), the run directory's earlier run, the steps left after a checkpoint, the disk space."""
import shutil

import pytest

from trainer.config import load_config
from trainer.errors import ConfigError
from trainer.checkpoint.run_record import earlier_run
from trainer.tools.preflight import check_disk_space, check_steps_left, preflight, with_vocab

CONFIG = "configs/glm-debug.yaml"


def test_the_vocabulary_is_resolved_into_a_new_config():
    given = load_config(CONFIG)
    resolved = with_vocab(given, 300)
    assert given.model.vocab_size == 0 and resolved.model.vocab_size == 300
    assert resolved.data is given.data and resolved.train == given.train
    fixed = load_config(CONFIG, ["model.vocab_size=512"])
    assert with_vocab(fixed, 300) is fixed
    with pytest.raises(ConfigError, match="model.vocab_size=256 is smaller than the tokenizer's 300"):
        with_vocab(load_config(CONFIG, ["model.vocab_size=256"]), 300)


def test_preflight_returns_the_resolved_config(tmp_path):
    given = load_config(CONFIG, [f"train.run_dir={tmp_path / 'run'}"])
    resolved = preflight(given, 1)
    assert given.model.vocab_size == 0 and resolved.model.vocab_size == 4096  # the embedded tokenizer's
    assert not (tmp_path / "run").exists()


def test_an_earlier_run_is_named_by_what_it_left(tmp_path):
    assert earlier_run(tmp_path / "absent") is None
    (tmp_path / "checkpoints").mkdir()
    assert earlier_run(tmp_path) is None  # an empty checkpoints/ holds no run
    (tmp_path / "metrics.jsonl").write_text("")
    assert earlier_run(tmp_path) == "metrics.jsonl"
    (tmp_path / "checkpoints" / "latest").write_text("global_step2")
    assert earlier_run(tmp_path) == "metrics.jsonl and checkpoints"


def test_steps_at_or_below_the_newest_checkpoint_are_refused(tmp_path):
    (tmp_path / "global_step6").mkdir()
    (tmp_path / "latest").write_text("global_step6")
    check_steps_left(tmp_path, 7)
    with pytest.raises(ConfigError, match="is at step 6, and train.steps=6 is the total"):
        check_steps_left(tmp_path, 6)


def test_too_little_disk_for_one_checkpoint_is_refused_in_readable_units(tmp_path, monkeypatch):
    config = load_config(CONFIG, ["model.vocab_size=4096", f"train.run_dir={tmp_path / 'run'}"])
    check_disk_space(config)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.raises(ConfigError, match=r"has 1\.0 MiB free but one checkpoint needs about [0-9.]+ MiB"):
        check_disk_space(config)
