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

import torch

from launch.cli import main, parse_args, prepare, runner_command
from tests.glm_processes import metrics, run_train, start_launch, tiny_overrides, train_args, wait_all
from trainer.engine.rendezvous import free_port

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # this machine has no GPU: say so instead of a warning


def hostfile(tmp_path: Path, nodes: int, slots: int) -> str:
    path = tmp_path / "hostfile"
    path.write_text("".join(f"gpu{i:02d} slots={slots}\n" for i in range(nodes)))
    return str(path)


def test_dry_run_plans_a_cluster_that_is_not_this_machine(tmp_path, capsys):
    argv = ["--config", "configs/glm-130b.yaml", "--hostfile", hostfile(tmp_path, 96, 8),
            "--gpu-memory", "40GB", "--tp", "4", "--pp", "8", "--dry-run", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["tp"], plan["pp"], plan["dp"], plan["world_size"]) == (4, 8, 24, 768)
    assert plan["micro_batch"] * plan["grad_accum"] * plan["dp"] == 4224
    assert plan["memory"]["per_gpu_estimate_gb"] <= 40
    rank = plan["ranks"][205]  # (pp_rank * 24 + dp_rank) * 4 + tp_rank = 205 -> (2, 3, 1)
    assert (rank["host"], rank["device"], rank["pp_rank"], rank["dp_rank"], rank["tp_rank"]) == ("gpu25", 5, 2, 3, 1)
    assert rank["blocks"] == [17, 26]


def test_glm_10b_on_one_gpu_dry_run_offloads_and_states_the_host_memory(capsys):
    argv = ["--config", "configs/glm-10b.yaml", "--gpus", "1", "--gpu-memory", "80GB", "--host-memory", "512GB",
            "--dry-run", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["pp"], plan["zero_stage"], plan["offload_optimizer"], plan["offload_params"]) == (1, 3, "cpu", "none")
    assert plan["memory"]["host_per_node_estimate_gb"] == 195.64
    assert plan["memory"]["host"] == {"capacity_gb": 512.0, "source": "--host-memory"}
    assert "optim.zero_stage=3" in plan["overrides"] and "optim.offload_optimizer=cpu" in plan["overrides"]


def test_host_memory_defaults_to_this_nodes_meminfo(capsys):
    assert main(["--config", "configs/glm-base.yaml", "--gpus", "8", "--gpu-memory", "80GB", "--dry-run", "--json"]) == 0
    host = json.loads(capsys.readouterr().out)["memory"]["host"]
    assert host["source"] == "MemAvailable in /proc/meminfo of this node" and host["capacity_gb"] > 0


def test_a_zero_stage_fixed_after_the_double_dash_is_kept(capsys):
    """glm-10b.yaml's recipe says pp 4: a fixed ZeRO-3 re-plans it to one stage instead of refusing."""
    argv = ["--config", "configs/glm-10b.yaml", "--gpus", "8", "--gpu-memory", "80GB", "--dry-run", "--json", "--",
            "--set", "optim.zero_stage=3"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["pp"], plan["zero_stage"], plan["offload_optimizer"]) == (1, 3, "none")


def test_gpus_dry_run_chooses_data_parallel(capsys):
    assert main(["--config", "configs/glm-base.yaml", "--gpus", "8", "--gpu-memory", "80GB", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["tp"], plan["pp"], plan["dp"]) == (1, 1, 8)


def test_glm_130b_on_512_gpus_plans_within_its_batch_size_warmup(capsys):
    """The ramp starts at 192 samples: micro-batch x dp must divide 192 as well as 4224."""
    argv = ["--config", "configs/glm-130b.yaml", "--gpus", "512", "--gpu-memory", "80GB", "--host-memory", "2TB",
            "--dry-run"]
    assert main(argv + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 512 and 192 % (plan["micro_batch"] * plan["dp"]) == 0
    assert plan["micro_batch"] * plan["grad_accum"] * plan["dp"] == 4224
    assert main(argv + ["--micro-batch", "6"]) == 0  # fixed: dp 32 (6 x 32 = 192), two stages to make room
    assert "micro-batch 6 x accumulation 22 x dp = global batch 4224" in capsys.readouterr().out


def test_dry_run_prints_the_summary_a_launch_prints(capsys):
    assert main(["--config", "configs/glm-base.yaml", "--gpus", "8", "--gpu-memory", "80GB", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["devices", "layout", "blocks", "memory", "zero"], out


def test_the_yamls_micro_batch_is_kept_when_it_fits_and_a_change_is_one_line(capsys):
    assert main(["--config", "configs/glm-debug.yaml", "--nproc", "2", "--tp", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 4 x accumulation 2" in out and "note:" not in out  # the YAML's 4, not the largest (8)
    assert main(["--config", "configs/glm-debug.yaml", "--nproc", "4", "--dry-run"]) == 0  # dp 4: 4 x 4 > 8
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note:    micro-batch 2 instead of the YAML's 4: micro-batch x dp 4 x 4 does not divide the "
                     "global batch 8"]


def test_a_fixed_micro_batch_the_warmup_cannot_take_is_refused_naming_the_layout_and_the_fix(capsys):
    argv = ["--config", "configs/glm-130b.yaml", "--gpus", "512", "--gpu-memory", "80GB", "--host-memory", "2TB",
            "--dry-run", "--tp", "8", "--pp", "1", "--micro-batch", "6"]
    _expect_one_error_line(argv, "micro-batch 6 x dp 64 (tp 8, pp 1) does not divide 192, the greatest common "
                                 "divisor of the global batch 4224 and the batch-size warmup's start 192 and "
                                 "increment 192: fix a micro-batch that divides 3", capsys)


BAD_INPUT = [
    (["--hostfile", "/no/such/hostfile", "--dry-run"], "hostfile /no/such/hostfile does not exist"),
    (["--gpus", "8", "--gpu-memory", "80GB", "--tp", "5"], "num_attention_heads=12 is not divisible by parallel.tp=5"),
    (["--gpus", "16", "--gpu-memory", "80GB", "--tp", "12"], "tp=12 is larger than the 8 devices per node"),
    (["--gpus", "8", "--gpu-memory", "eighty"], "--gpu-memory 'eighty' is not a size"),
    (["--gpus", "8", "--gpu-memory", "80GB", "--host-memory", "lots"], "--host-memory 'lots' is not a size"),
    (["--gpus", "8", "--gpu-memory", "80GB", "--", "--set", "optim.zero_stage=3", "--set", "parallel.pp=2"],
     "optim.zero_stage=3 with parallel.pp=2"),
    (["--gpus", "8", "--gpu-memory", "80GB", "--", "--set", "parallel.tp=3"], "tp=3 does not divide the device count of host node0"),
    (["--nproc", "2", "--", "--config", "x.yaml"], "give --config to glm-launch"),
    (["--gpus", "8", "--nproc", "2"], "not allowed with argument"),
    (["--gpus", "16", "--gpu-memory", "80GB"], "asks for more GPUs than this node has"),
    (["--nproc", "2", "--master-port", "99999"], "--master-port 99999 is not a TCP port"),
    (["--nproc", "2", "--node-rank", "0"], "--node-rank needs --hostfile"),
    (["--nproc", "2", "--master-addr", "10.0.0.1"], "--master-addr is for several nodes"),
    (["--nproc", "2", "--min-devices", "3"], "2 device(s) found, fewer than --min-devices 3"),
    (["--nproc", "2", "--max-restarts", "-1"], "--max-restarts must be >= 0"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(extra, message, capsys):
    _expect_one_error_line(["--config", "configs/glm-base.yaml"] + extra, message, capsys)


@pytest.mark.parametrize("extra, message", [
    (["--node-rank", "2", "--master-addr", "127.0.0.1"], "--node-rank 2 is not a node of the hostfile: it lists 2"),
    (["--node-rank", "1"], "--node-rank needs --master-addr"),
])
def test_bad_node_rank_is_one_line_and_exit_2(extra, message, capsys, tmp_path):
    argv = ["--config", "configs/glm-base.yaml", "--hostfile", hostfile(tmp_path, 2, 8), "--gpu-memory", "80GB"]
    _expect_one_error_line(argv + extra, message, capsys)


def _expect_one_error_line(argv: list[str], message: str, capsys) -> None:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_bad_input_from_the_console_script_starts_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch.cli", "--config", "configs/glm-130b.yaml",
                             "--gpus", "8", "--gpu-memory", "40GB", "--host-memory", "1TB"], cwd=REPO,
                            capture_output=True, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"error: the model fits on 8 devices of 40\.0 GB only with ZeRO-3, optimizer offload cpu, weights offload "
        r"cpu, which needs \d+\.\d GB of host memory per node, more than the 1000\.0 GB there \(--host-memory\): "
        r"use nodes with more host memory \(--host-memory\), NVMe offload \(set optim\.nvme_path\), or 24 devices "
        r"\(tp 1, pp 1, dp 24, micro-batch \d+, recomputation on, ZeRO-3, optimizer offload cpu, \d+\.\d GB per "
        r"device\)", lines[0]), lines


def test_runner_command_is_deepspeeds_own_launcher(tmp_path):
    from deepspeed.launcher.runner import parse_args as deepspeed_args

    argv = ["--config", "configs/glm-debug.yaml", "--nproc", "2", "--", "--set", "train.steps=2", "--print-model"]
    args, train_args, _, plan = prepare(argv)
    command = runner_command(plan, args, train_args, None, {}, tmp_path / "launch_config.yaml", restarts=1)
    assert command[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    parsed = deepspeed_args(command[4:])
    assert parsed.num_gpus == 2 and parsed.module and parsed.no_local_rank
    assert parsed.log_level == "warning"  # not the environment it sets for each rank (CUDA_VISIBLE_DEVICES on CPU)
    assert parsed.user_script == "trainer.train"
    # The ranks get the config glm-launch resolved (the --set values and the plan are in it) and the other
    # glm-train arguments as given.
    assert parsed.user_args == ["--resolved-config", str(tmp_path / "launch_config.yaml"), "--restarts", "1",
                                "--print-model"]


def test_runner_command_under_slurm_runs_one_launcher_per_node_without_ssh(tmp_path):
    args, train_args = parse_args(["--config", "configs/glm-base.yaml", "--gpu-memory", "80GB"])
    from launch.devices import HostMemory, discover
    from launch.planner import plan_layout
    from trainer.config import load_config

    cluster = discover(gpu_memory="80GB", env={"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "8"})
    plan = plan_layout(load_config(args.config), cluster, HostMemory(10 ** 12, "--host-memory"))
    parsed = __import__("deepspeed.launcher.runner", fromlist=["parse_args"]).parse_args(
        runner_command(plan, args, train_args, "/tmp/h", {"SLURM_NODEID": "1"}, tmp_path / "c.yaml")[4:])
    assert (parsed.hostfile, parsed.no_ssh, parsed.node_rank, parsed.master_addr) == ("/tmp/h", True, 1, "n1")


def test_runner_command_for_one_node_of_a_hostfile(tmp_path):
    argv = ["--config", "configs/glm-base.yaml", "--hostfile", hostfile(tmp_path, 2, 8), "--gpu-memory", "80GB",
            "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port", "29123"]
    args, train_args_, _, plan = prepare(argv)
    parsed = __import__("deepspeed.launcher.runner", fromlist=["parse_args"]).parse_args(
        runner_command(plan, args, train_args_, args.hostfile, {}, tmp_path / "c.yaml")[4:])
    assert (parsed.hostfile, parsed.no_ssh, parsed.node_rank) == (args.hostfile, True, 1)
    assert (parsed.master_addr, parsed.master_port) == ("10.1.2.3", 29123)


def test_two_nodes_on_this_machine_match_one_process(tmp_path):
    """Two glm-launch processes, node ranks 0 and 1 of a two-host hostfile (one CPU rank each, dp 2), meet at
    127.0.0.1 without ssh and train the losses of one process run directly."""
    steps = 3
    single = run_train(train_args(tmp_path / "single", steps))
    assert single.returncode == 0, single.stderr[-3000:]
    hosts = tmp_path / "hostfile"
    hosts.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    nodes = [start_launch(["--hostfile", str(hosts), "--node-rank", str(node), "--master-addr", "127.0.0.1",
                           "--master-port", port, "--", *tiny_overrides(tmp_path / "two", steps)],
                          tmp_path / f"node{node}.log") for node in (0, 1)]
    assert wait_all(nodes, timeout=300) == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    log = (tmp_path / "node0.log").read_text()
    assert "layout:  tp 1 x pp 1 x dp 2" in log and "devices: 2 cpu on 2 nodes (hostfile)" in log
    node1 = (tmp_path / "node1.log").read_text()  # its ranks' start is implied: dp 2 cannot finish without rank 1
    assert "--no_ssh --node_rank 1" in node1 and "layout:" not in node1  # the plan is printed once per job
    two = metrics(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(1, steps + 1))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in two], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in metrics(tmp_path / "single")], dtype=torch.float64),
                               rtol=1e-5, atol=0)


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


def test_nproc_2_tp_2_keeps_the_yamls_micro_batch_and_the_single_process_losses(tmp_path):
    """glm-debug's micro-batch 4 fits at tp 2 (dp 1, 8 rows per rank): glm-launch keeps it instead of taking 8,
    so the run is the single-process run's, micro-batch for micro-batch."""
    steps, model = 3, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4"]
    single = run_train(["--config", str(REPO / "configs/glm-debug.yaml")]
                       + [a for item in model + [f"train.steps={steps}", f"train.run_dir={tmp_path / 'single'}"]
                          for a in ("--set", item)])
    assert single.returncode == 0, single.stderr[-3000:]
    launch = start_launch(["--nproc", "2", "--tp", "2", "--"]
                          + [a for item in model + [f"train.steps={steps}", f"train.run_dir={tmp_path / 'tp2'}"]
                             for a in ("--set", item)], tmp_path / "launch.log")
    assert wait_all([launch], timeout=600) == [0], (tmp_path / "launch.log").read_text()[-3000:]
    log = (tmp_path / "launch.log").read_text()
    assert "micro-batch 4 x accumulation 2 x dp = global batch 8" in log and "note:" not in log, log[-3000:]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in metrics(tmp_path / "tp2")], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in metrics(tmp_path / "single")], dtype=torch.float64),
                               rtol=1e-5, atol=0)
