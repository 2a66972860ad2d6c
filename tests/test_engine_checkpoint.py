"""trainer/engine/checkpoint.py: which checkpoint a resume takes (newest that verifies, `latest` first, one
warning per unusable one), and that the lr after a resume follows the resumed run's own schedule."""
import json
import logging

import pytest
import torch

from tests.distributed import run_distributed
from tests.glm_processes import metrics, run_train, train_args
from trainer.checkpoint.manifest import write_manifest
from trainer.checkpoint.tags import list_tags, resume_order, tag_for
from trainer.engine.checkpoint import choose_tag, follow_schedule
from trainer.errors import CheckpointError


def _checkpoints(root, steps, corrupted=(), latest=None):
    for step in steps:
        tag_dir = root / tag_for(step)
        tag_dir.mkdir(parents=True)
        (tag_dir / "weights.pt").write_bytes(bytes(range(step)))
        write_manifest(tag_dir)
        if step in corrupted:
            (tag_dir / "weights.pt").write_bytes(bytes(step))  # same size, other bytes: the CRC-32 fails
    (root / "latest").write_text(tag_for(latest if latest is not None else max(steps)))
    return root


def _choose(rank, world_size, checkpoint_dir, out):
    try:
        out.write_text(json.dumps({"tag": choose_tag(checkpoint_dir)}))
    except CheckpointError as error:
        out.write_text(json.dumps({"error": str(error)}))


def _chosen(tmp_path, checkpoint_dir):
    out = tmp_path / "chosen.json"
    run_distributed(_choose, 1, checkpoint_dir, out)
    return json.loads(out.read_text())


def test_tags_are_listed_newest_first_by_step_number(tmp_path):
    root = _checkpoints(tmp_path / "checkpoints", [2, 10, 9])
    (root / ".global_step12.partial").mkdir()  # an unfinished save is no checkpoint
    (root / "global_stepX").mkdir()
    assert list_tags(root) == ["global_step10", "global_step9", "global_step2"]
    assert list_tags(tmp_path / "absent") == []


def test_the_newest_checkpoint_that_verifies_is_chosen(tmp_path):
    root = _checkpoints(tmp_path / "checkpoints", [2, 4, 6], corrupted=[6])
    assert _chosen(tmp_path, root) == {"tag": "global_step4"}
    # `latest` is tried first even when a higher-numbered directory exists (a leftover of an older run).
    root = _checkpoints(tmp_path / "other", [2, 4, 8], latest=4)
    assert _chosen(tmp_path, root) == {"tag": "global_step4"}


def test_no_checkpoint_that_verifies_is_one_error(tmp_path):
    root = _checkpoints(tmp_path / "checkpoints", [2, 4], corrupted=[2, 4])
    error = _chosen(tmp_path, root)["error"]
    assert "holds no complete checkpoint" in error and "train without resume" in error


def test_an_unusable_checkpoint_is_one_warning_naming_what_comes_next(tmp_path, caplog):
    import torch.distributed as dist

    root = _checkpoints(tmp_path / "checkpoints", [2, 4], corrupted=[4])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with caplog.at_level(logging.WARNING, logger="glm.checkpoint"):
            assert choose_tag(root) == "global_step2"
    finally:
        dist.destroy_process_group()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "global_step4 is unusable (weights.pt fails its CRC-32 check)" in warnings[0]
    assert "falling back to the previous one" in warnings[0]


def test_a_latest_naming_a_missing_checkpoint_is_one_warning_and_the_newest_is_taken(tmp_path, caplog):
    import torch.distributed as dist

    root = _checkpoints(tmp_path / "checkpoints", [2, 4], latest=9)
    assert resume_order(root) == ["global_step4", "global_step2"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with caplog.at_level(logging.WARNING, logger="glm.checkpoint"):
            assert choose_tag(root) == "global_step4"
    finally:
        dist.destroy_process_group()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "names 'global_step9', which is not a checkpoint there" in warnings[0]


def test_follow_schedule_sets_the_lr_of_this_runs_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    follow_schedule(scheduler, [2.0])
    assert optimizer.param_groups[0]["lr"] == 2.0 / 4 and scheduler.base_lrs == [2.0]


@pytest.mark.parametrize("change", [["train.steps=8"], ["train.steps=8", "optim.lr=2e-3"]])
def test_a_resume_with_another_schedule_follows_it_from_the_first_resumed_step(tmp_path, change):
    # The checkpoint's run decayed over 4 steps; the resumed run decays over 8: its steps 5-8 use the lr of a run
    # that had train.steps=8 from the start (before, step 5 used the first run's own end-of-cosine lr).
    assert run_train(train_args(tmp_path / "run", 4, "optim.decay_steps=0")).returncode == 0
    resumed = run_train(train_args(tmp_path / "run", 8, "optim.decay_steps=0", "train.resume=true", *change))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_train(train_args(tmp_path / "straight", 8, "optim.decay_steps=0", *change))
    assert straight.returncode == 0, straight.stderr[-3000:]
    lrs = [r["lr"] for r in metrics(tmp_path / "run")][4:]
    torch.testing.assert_close(lrs, [r["lr"] for r in metrics(tmp_path / "straight")][4:], rtol=1e-12, atol=0)
    assert "resumed from step 4 of 8" in resumed.stdout
    assert "the LR schedule differs from the checkpoint's" in resumed.stderr  # not re-planned silently


def test_the_lr_schedule_change_is_said(caplog):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    optimizer.step()
    scheduler.step()
    with caplog.at_level(logging.WARNING, logger="glm.checkpoint"):
        follow_schedule(scheduler, [0.5])  # the same schedule: nothing to say
        assert not caplog.records
        follow_schedule(scheduler, [2.0])
    assert "step 2 trains at lr 1.000e+00 instead of 2.500e-01" in caplog.records[0].getMessage()


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    import errno
    import shutil

    from trainer.engine import checkpoint

    assert checkpoint.disk_full_error(RuntimeError("some other failure"), tmp_path / "x") is None
    enospc = OSError(errno.ENOSPC, "No space left on device")
    assert "no space left on device writing the checkpoint" in str(checkpoint.disk_full_error(enospc, tmp_path / "x"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=4096))
    torch_error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    assert "free space on that file system" in str(checkpoint.disk_full_error(torch_error, tmp_path / "x"))
