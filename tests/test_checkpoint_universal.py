"""Resume at another layout through the user's entry point: a run trained at tp=2 and resumed with
`--set train.resume=true` at tp=1 x pp=2 (and at dp=2), one trained at dp=2 and resumed at tp=2, and one
trained at pp=2 (the tied embedding's Adam state on both stages) and resumed at dp=2,
continue the loss curve of an uninterrupted run (fp32, 1e-5 relative), weights and Adam state carried
over (trainer.checkpoint.universal). In fp32 the dp=1 layouts run without ZeRO (trainer/engine/ds_config.py)
and dp=2 with ZeRO-1, so both optimizer formats are read and written."""
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
    (refreshing DeepSpeed's fp32 master copy from them) with fresh Adam moments. Against bf16 ZeRO-1, whose
    `bf16_zero_*` files DeepSpeed resumes whole: the step after the resume sees the same weights, the one
    after nearly so (a master copy left at the initial weights would undo the first two steps)."""
    losses, logs = {}, {}
    for stage in (0, 1):
        run_dir, args = tmp_path / f"zero{stage}", ("train.precision=bf16", "optim.lr=0.05", *zero_stage_overrides(stage, tmp_path))
        for steps, resume in ((2, []), (4, ["train.resume=true"])):
            result = run_train(train_args(run_dir, steps, *args, *resume))
            assert result.returncode == 0, result.stderr[-3000:]
        logs[stage] = result.stdout + result.stderr
        losses[stage] = [r["loss"] for r in metrics(run_dir)]
    assert "Adam moments start from zero" in logs[0] and "Adam moments" not in logs[1]
    torch.testing.assert_close(torch.tensor(losses[0][:3]), torch.tensor(losses[1][:3]), rtol=1e-3, atol=0)
    # fresh moments change the first step after the resume, but far less than undoing two steps would
    assert abs(losses[0][3] - losses[1][3]) < (losses[1][0] - losses[1][3]) / 4, losses
