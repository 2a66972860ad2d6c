"""glm-launch: the dry-run plan, bad input, the DeepSpeed runner command, and a real CPU run."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main, parse_args, prepare, runner_command

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # this machine has no GPU: say so instead of a warning


def hostfile(tmp_path: Path, nodes: int, slots: int) -> str:
    path = tmp_path / "hostfile"
    path.write_text("".join(f"gpu{i:02d} slots={slots}\n" for i in range(nodes)))
    return str(path)


def test_dry_run_plans_a_cluster_that_is_not_this_machine(tmp_path, capsys):
    argv = ["--config", "configs/glm-130b.yaml", "--hostfile", hostfile(tmp_path, 96, 8),
            "--gpu-memory", "40GB", "--tp", "4", "--pp", "8", "--dry-run"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["tp"], plan["pp"], plan["dp"], plan["world_size"]) == (4, 8, 24, 768)
    assert plan["micro_batch"] * plan["grad_accum"] * plan["dp"] == 4224
    assert plan["memory"]["per_gpu_estimate_gb"] <= 40
    rank = plan["ranks"][205]  # (pp_rank * 24 + dp_rank) * 4 + tp_rank = 205 -> (2, 3, 1)
    assert (rank["host"], rank["device"], rank["pp_rank"], rank["dp_rank"], rank["tp_rank"]) == ("gpu25", 5, 2, 3, 1)
    assert rank["blocks"] == [17, 26]


def test_gpus_dry_run_chooses_data_parallel(capsys):
    assert main(["--config", "configs/glm-base.yaml", "--gpus", "8", "--gpu-memory", "80GB", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["tp"], plan["pp"], plan["dp"]) == (1, 1, 8)


BAD_INPUT = [
    (["--hostfile", "/no/such/hostfile", "--dry-run"], "hostfile /no/such/hostfile does not exist"),
    (["--gpus", "8", "--gpu-memory", "80GB", "--tp", "5"], "num_attention_heads=12 is not divisible by parallel.tp=5"),
    (["--gpus", "16", "--gpu-memory", "80GB", "--tp", "12"], "tp=12 is larger than the 8 devices per node"),
    (["--gpus", "8", "--gpu-memory", "eighty"], "--gpu-memory 'eighty' is not a size"),
    (["--gpus", "8", "--gpu-memory", "80GB", "--", "--set", "parallel.tp=3"], "tp=3 does not divide the device count of host node0"),
    (["--nproc", "2", "--", "--config", "x.yaml"], "give --config to glm-launch"),
    (["--gpus", "8", "--nproc", "2"], "not allowed with argument"),
    (["--gpus", "16", "--gpu-memory", "80GB"], "asks for more GPUs than this node has"),
    (["--nproc", "2", "--master-port", "99999"], "--master-port 99999 is not a TCP port"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(extra, message, capsys):
    argv = ["--config", "configs/glm-base.yaml"] + extra
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_bad_input_from_the_console_script_starts_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch.cli", "--config", "configs/glm-130b.yaml",
                             "--gpus", "8", "--gpu-memory", "40GB"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"error: the model does not fit on 8 devices of 40\.0 GB: the smallest device count that works is 72 "
        r"\(tp 8, pp 9, dp 1, micro-batch 1, checkpointing on, \d+\.\d GB per device\)", lines[0]), lines


def test_runner_command_is_deepspeeds_own_launcher(tmp_path):
    from deepspeed.launcher.runner import parse_args as deepspeed_args

    argv = ["--config", "configs/glm-debug.yaml", "--nproc", "2", "--", "--set", "train.steps=2"]
    args, train_args, _, plan = prepare(argv)
    command = runner_command(plan, args, train_args, None, {})
    assert command[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    parsed = deepspeed_args(command[4:])
    assert parsed.num_gpus == 2 and parsed.module and parsed.no_local_rank
    assert parsed.user_script == "trainer.train"
    assert parsed.user_args == ["--config", str(REPO / "configs/glm-debug.yaml"), "--set", "train.steps=2",
                                "--set", "parallel.tp=1", "--set", "parallel.pp=1",
                                "--set", "parallel.micro_batch_size=4",
                                "--set", "parallel.activation_checkpoint_interval=0"]


def test_runner_command_under_slurm_runs_one_launcher_per_node_without_ssh(tmp_path):
    args, train_args = parse_args(["--config", "configs/glm-base.yaml", "--gpu-memory", "80GB"])
    from launch.devices import discover
    from launch.planner import plan_layout
    from trainer.config import load_config

    cluster = discover(gpu_memory="80GB", env={"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "8"})
    plan = plan_layout(load_config(args.config), cluster)
    parsed = __import__("deepspeed.launcher.runner", fromlist=["parse_args"]).parse_args(
        runner_command(plan, args, train_args, "/tmp/h", {"SLURM_NODEID": "1"})[4:])
    assert (parsed.hostfile, parsed.no_ssh, parsed.node_rank, parsed.master_addr) == ("/tmp/h", True, 1, "n1")


def test_nproc_2_trains_on_cpu_with_gloo(tmp_path):
    """The user's own command, end to end: glm-launch plans dp 2 and DeepSpeed's runner starts two
    gloo ranks that train two steps of 8 samples."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["glm-launch", "--nproc", "2", "--config", "configs/glm-debug.yaml", "--",
                             "--set", "train.steps=2", "--set", f"train.run_dir={run_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "layout:  tp 1 x pp 1 x dp 2; micro-batch 4 x accumulation 1" in result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert [r["consumed_samples"] for r in records] == [8, 16]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
