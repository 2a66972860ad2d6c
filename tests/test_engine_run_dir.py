"""trainer/engine/run_dir.py: one trainer owns a run directory at a time. A second one is refused in one line
naming the owner, and a dead owner (SIGKILL included) never leaves the directory locked."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.glm_processes import REPO, _env, metrics, train_args
from trainer.engine.run_dir import RUN_LOCK, RunDirLock
from trainer.errors import ConfigError


def test_a_held_run_dir_is_refused_naming_its_owner_until_released(tmp_path):
    first = RunDirLock(tmp_path / "run")
    with pytest.raises(ConfigError, match=f"is in use by another run \\(pid {os.getpid()} on "
                                          f"{socket.gethostname()}, since "):
        RunDirLock(tmp_path / "run")
    first.release()
    RunDirLock(tmp_path / "run").release()


def test_a_killed_owner_leaves_the_run_dir_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from trainer.engine.run_dir import "
                               "RunDirLock; lock = RunDirLock(Path(sys.argv[1])); print('held', flush=True); "
                               "time.sleep(300)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on "):
            RunDirLock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunDirLock(tmp_path).release()
    assert f"pid {os.getpid()} on " in (tmp_path / RUN_LOCK).read_text()  # the newest owner names itself


def test_two_trainers_on_one_run_dir_one_runs_the_other_exits_2_naming_it(tmp_path):
    """Started together, both pass preflight (the directory is empty); exactly one owns it and trains, the
    other stops before writing anything, and the metrics are the winner's alone."""
    run_dir, steps = tmp_path / "run", 12
    procs = [subprocess.Popen([sys.executable, "-m", "trainer.train", *train_args(run_dir, steps)], cwd=REPO,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, 2], outputs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    errors = [line for line in outputs[loser][1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, outputs[loser][1]
    assert (f"train.run_dir={run_dir} is in use by another run (pid {procs[winner].pid} on {socket.gethostname()}"
            in errors[0]), errors
    assert [record["step"] for record in metrics(run_dir)] == list(range(1, steps + 1))
