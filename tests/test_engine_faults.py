"""Reliability: preemption, a killed rank, injected NaNs and a corrupted checkpoint all end in a clean
resume whose losses equal an uninterrupted run's (fp32, 1e-5)."""
import json
import math
import random
import signal

import pytest
import torch

from tests.glm_processes import (metrics, run_train, start_ranks, train_args, wait_all, wait_for_step,
                                 zero_stage_overrides)
from trainer.engine.faults import INJECT_NAN_STEPS

STEPS = 8


def _losses(run_dir):
    return torch.tensor([r["loss"] for r in metrics(run_dir)], dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 2-rank (dp=2) and 1-rank runs of the same config."""
    root = tmp_path_factory.mktemp("reference")
    procs = start_ranks(train_args(root / "dp2", STEPS), 2, root)
    assert wait_all(procs) == [0, 0], (root / "rank0.log").read_text()[-3000:]
    return _losses(root / "dp2")


def test_kill_9_of_one_rank_then_resume(reference, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, STEPS, "train.save_interval=2", "train.collective_timeout_minutes=1")
    procs = start_ranks(args, 2, tmp_path)
    kill_after = random.Random(0).randint(3, 6)
    wait_for_step(run_dir, kill_after, procs)
    procs[1].send_signal(signal.SIGKILL)
    codes = wait_all(procs, timeout=120)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    assert "rank 0 (pipeline stage 0" in (tmp_path / "rank0.log").read_text()
    procs = start_ranks(train_args(run_dir, STEPS, "train.save_interval=2", "train.resume=true"), 2, tmp_path)
    assert wait_all(procs) == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    torch.testing.assert_close(_losses(run_dir), reference, rtol=1e-5, atol=0)


def test_sigterm_saves_the_current_step_and_resume_continues(reference, tmp_path):
    run_dir = tmp_path / "run"
    procs = start_ranks(train_args(run_dir, STEPS), 2, tmp_path)
    wait_for_step(run_dir, 3, procs)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert wait_all(procs) == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    stopped_at = metrics(run_dir)[-1]["step"]
    assert 3 <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{stopped_at}"
    procs = start_ranks(train_args(run_dir, STEPS, "train.resume=true"), 2, tmp_path)
    assert wait_all(procs) == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    torch.testing.assert_close(_losses(run_dir), reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("zero_stage", [1, 0])  # DeepSpeed's ZeRO-1 overflow path, and the trainer's own
def test_injected_nan_is_skipped_and_counted(tmp_path, zero_stage):
    zero = zero_stage_overrides(zero_stage, tmp_path)
    clean = run_train(train_args(tmp_path / "clean", 5, *zero))
    assert clean.returncode == 0, clean.stderr[-3000:]
    faulty = run_train(train_args(tmp_path / "nan", 5, *zero), env={INJECT_NAN_STEPS: "3"})
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    good, bad = metrics(tmp_path / "clean"), metrics(tmp_path / "nan")
    saved = tmp_path / "nan" / "checkpoints" / "global_step5"
    assert (saved / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file() == (zero_stage == 1)  # the path under test
    assert [r["skipped"] for r in bad] == [0, 0, 1, 0, 0] and bad[-1]["skipped_total"] == 1
    assert math.isnan(bad[2]["loss"])
    torch.testing.assert_close([r["loss"] for r in bad[:2]], [r["loss"] for r in good[:2]])
    # The skipped step changed nothing: step 4 starts from the weights after step 2 and the LR schedule
    # did not advance, so step 4 runs at the learning rate the clean run had at step 3.
    assert bad[3]["lr"] == pytest.approx(good[2]["lr"])
    assert math.isfinite(bad[3]["loss"]) and bad[3]["loss"] != good[3]["loss"]


def test_too_many_nans_in_a_row_stop_with_a_checkpoint(tmp_path):
    result = run_train(train_args(tmp_path / "run", 8, "train.max_nonfinite_in_a_row=2"),
                       env={INJECT_NAN_STEPS: "3,4,5"})
    assert result.returncode == 2
    assert "3 steps in a row had a non-finite loss" in result.stderr
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "global_step5"


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    reference = run_train(train_args(tmp_path / "ref", 6))
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "run"
    first = run_train(train_args(run_dir, 4, "train.save_interval=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    victim = max((run_dir / "checkpoints" / "global_step4").glob("*model_states.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    resumed = run_train(train_args(run_dir, 6, "train.resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "global_step4 is unusable" in resumed.stderr + resumed.stdout
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(_losses(run_dir), _losses(tmp_path / "ref"), rtol=1e-5, atol=0)


def test_keep_the_newest_checkpoints_each_with_a_manifest(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(train_args(run_dir, 4, "train.save_interval=1", "train.keep_checkpoints=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("global_step*")) == ["global_step3", "global_step4"]
    assert not list(checkpoints.glob(".*partial"))
    manifest = json.loads((checkpoints / "global_step4" / "manifest.json").read_text())["files"]
    assert "rng/rank0.pt" in manifest and "mp_rank_00_model_states.pt" in manifest


def test_resume_survives_what_a_crash_leaves(tmp_path):
    """A torn last line and a garbled one in metrics.jsonl, `latest` naming a checkpoint that is not there, and
    a manifest that is valid JSON of the wrong shape: the resume takes the newest complete checkpoint, says
    so once for each, cuts the metrics back to its step, and gives the uninterrupted run's losses."""
    reference = run_train(train_args(tmp_path / "ref", 6))
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "run"
    first = run_train(train_args(run_dir, 4, "train.save_interval=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, "\x00\x00 not a record")
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "loss": 7.')
    (run_dir / "checkpoints" / "latest").write_text("global_step6")
    (run_dir / "checkpoints" / "global_step4" / "manifest.json").write_text('{"files": []}')
    resumed = run_train(train_args(run_dir, 6, "train.resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stderr + resumed.stdout
    assert said.count("names 'global_step6', which is not a checkpoint there") == 1, said[-3000:]
    assert said.count("global_step4 is unusable (unreadable manifest") == 1, said[-3000:]
    assert said.count("had 2 unreadable line(s)") == 1, said[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(_losses(run_dir), _losses(tmp_path / "ref"), rtol=1e-5, atol=0)
