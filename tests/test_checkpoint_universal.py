"""Resume at another layout through the user's entry point: a run trained at tp=2 and resumed with
`--set train.resume=true` at tp=1 x pp=2 (and at dp=2), one trained at dp=2 and resumed at tp=2, and one
trained at pp=2 (the tied embedding's Adam state on both stages) and resumed at dp=2,
continue the loss curve of an uninterrupted run (fp32, 1e-5 relative), weights and Adam state carried
over (read by trainer/checkpoint/universal.py, loaded by trainer/engine/resume.py). In fp32 the dp=1 layouts
run without ZeRO (trainer/engine/ds_config.py) and dp=2 with ZeRO-1, so both optimizer formats are read and
written."""
import shutil

import pytest
import torch

from tests.glm_processes import metrics, run_train, start_ranks, train_args, wait_all, zero_stage_overrides

STEPS, FIRST = 6, 3
GEGLU = ["model.mlp=geglu"]  # the fused GeGLU halves and QKV must be split and merged correctly


def _run(run_dir, log_dir, steps, *overrides):
    procs = start_ranks(train_args(run_dir, steps, *GEGLU, *overrides), 2, log_dir)
    assert wait_all(procs) == [0, 0], (log_dir / "rank0.log").read_text()[-3000:]
    return [r["loss"] for r in metrics(run_dir)]


@pytest.fixture(scope="module")
def first_half(tmp_path_factory):
    root = tmp_path_factory.mktemp("universal")
    reference = _run(root / "uninterrupted", root, STEPS, "parallel.tp=2")
    first = {"tp2": _run(root / "tp2", root, FIRST, "parallel.tp=2"), "dp2": _run(root / "dp2", root, FIRST),
             "pp2": _run(root / "pp2", root, FIRST, "parallel.pp=2")}
    return root, reference, first


@pytest.mark.parametrize("source, name, overrides", [("tp2", "tp1_pp2", ["parallel.pp=2"]), ("tp2", "dp2", []),
                                                     ("dp2", "tp2", ["parallel.tp=2"]), ("pp2", "dp2", [])])
def test_resume_at_another_layout_continues_the_curve(first_half, tmp_path, source, name, overrides):
    root, reference, first = first_half
    first = first[source]
    run_dir = tmp_path / name
    shutil.copytree(root / source, run_dir)
    losses = _run(run_dir, tmp_path, STEPS, "train.resume=true", *overrides)
    assert len(first) == FIRST and len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses[:FIRST]), torch.tensor(first))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)
    assert "on a new layout" in (tmp_path / "rank0.log").read_text()
    assert len(set(reference)) == STEPS  # the curve moves: equal constants would not test anything


def test_bf16_without_zero_resumes_its_weights(tmp_path):
    """DeepSpeed 0.19.8 cannot load its own bf16 stage-0 pipeline checkpoints; the trainer loads their weights
    (refreshing DeepSpeed's fp32 master copy from them) with fresh Adam moments. Against the same run
    uninterrupted (pp=2): the step after the resume sees the same weights, the one after nearly so (a master
    copy left at the initial weights would undo the first two steps). The plain engine (pp=1) loads its own."""
    args = ("train.precision=bf16", "optim.lr=0.05", "parallel.pp=2", "optim.zero_stage=0")

    def run(run_dir, steps, *resume):
        procs = start_ranks(train_args(run_dir, steps, *args, *resume), 2, tmp_path)
        assert wait_all(procs) == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
        return (tmp_path / "rank0.log").read_text()

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    log = run(tmp_path / "resumed", 4, "train.resume=true")
    straight, resumed = ([r["loss"] for r in metrics(tmp_path / name)] for name in ("straight", "resumed"))
    assert "Adam moments start from zero" in log
    torch.testing.assert_close(torch.tensor(resumed[:3]), torch.tensor(straight[:3]), rtol=1e-3, atol=0)
    # fresh moments change the first step after the resume; a master copy left at the initial weights would undo
    # the first two steps, putting step 4 near step 2's loss: it must be nearer the straight run's
    assert abs(resumed[3] - straight[3]) < abs(resumed[3] - straight[1]) / 1.5, (resumed, straight)


def test_bf16_plain_engine_resumes_whole(tmp_path):
    """At pp = 1 DeepSpeed's plain engine loads its own bf16 checkpoint, stage 0 included: 2 + 2 steps are the
    4 straight ones."""
    args = ("train.precision=bf16", "optim.lr=0.05", "optim.zero_stage=0")
    straight = run_train(train_args(tmp_path / "straight", 4, *args))
    assert straight.returncode == 0, straight.stderr[-3000:]
    for steps, resume in ((2, []), (4, ["train.resume=true"])):
        result = run_train(train_args(tmp_path / "resumed", steps, *args, *resume))
        assert result.returncode == 0, result.stderr[-3000:]
    assert "new layout" not in result.stdout + result.stderr
    assert [r["loss"] for r in metrics(tmp_path / "resumed")] == [r["loss"] for r in metrics(tmp_path / "straight")]
