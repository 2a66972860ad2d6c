"""Run glm-train as real processes, the way users do: one process directly, or N ranks with the
environment a launcher would set. Used by the fault and CLI tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from trainer.engine.rendezvous import free_port

REPO = Path(__file__).resolve().parent.parent
# The tiny layout every fault test trains: seconds per run on two CPU cores.
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "data.seq_length=64",
        "model.max_sequence_length=64", "parallel.micro_batch_size=2", "parallel.global_batch_size=4",
        "optim.warmup_steps=2", "optim.decay_steps=10"]


def tiny_overrides(run_dir: Path, steps: int, *overrides: str) -> list[str]:
    """`--set` arguments of the tiny run (what follows `--` for glm-launch)."""
    return [arg for item in TINY + [f"train.run_dir={run_dir}", f"train.steps={steps}", *overrides]
            for arg in ("--set", item)]


def train_args(run_dir: Path, steps: int, *overrides: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "glm-debug.yaml"), *tiny_overrides(run_dir, steps, *overrides)]


def start_launch(launch_args: list[str], log: Path) -> subprocess.Popen:
    """glm-launch with the tiny config; stdout+stderr to `log`."""
    return subprocess.Popen(["glm-launch", "--config", str(REPO / "configs" / "glm-debug.yaml"), *launch_args],
                            cwd=REPO, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def zero_stage_overrides(stage: int, directory: Path) -> list[str]:
    """Config overrides that run the engine at ZeRO `stage` even with one data-parallel rank, where an fp32 run
    would otherwise use stage 0 (trainer/engine/ds_config.py): a user DeepSpeed JSON forces stage 1."""
    if stage == 0:
        return ["optim.zero_stage=0"]
    path = directory / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return [f"train.deepspeed_config={path}"]


def _env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def run_train(args: list[str], timeout: float = 300, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """glm-train run directly (single-process debug mode); `env` adds environment variables."""
    return subprocess.run([sys.executable, "-m", "trainer.train", *args], cwd=REPO, env=_env(env),
                          capture_output=True, text=True, timeout=timeout)


def start_ranks(args: list[str], world_size: int, log_dir: Path) -> list[subprocess.Popen]:
    """world_size ranks of glm-train with a launcher's environment; stdout+stderr to log_dir/rankR.log."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = _env({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer.train", *args], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return codes


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(metrics(run_dir)) >= step:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")
