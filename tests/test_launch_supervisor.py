"""glm-launch --max-restarts: a rank killed (SIGKILL) or stopped (SIGSTOP) mid-run, and devices that shrink
from two to one, end in a finished run whose every step's loss equals the uninterrupted two-rank run's
(fp32, 1e-5), each step once in metrics.jsonl, and the restart in the log, restarts.jsonl and the metrics."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.ranks import RankProcesses
from launch.supervisor import Start, supervise
from trainer.errors import ConfigError
from tests.glm_processes import metrics, start_launch, tiny_overrides, wait_all, wait_for_step

STEPS = 5
SAVE = "train.save_interval=2"


def _losses(run_dir: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in metrics(run_dir)], dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> torch.Tensor:
    """The uninterrupted `glm-launch --nproc 2` run (dp 2)."""
    root = tmp_path_factory.mktemp("reference")
    launch = start_launch(["--nproc", "2", "--", *tiny_overrides(root / "run", STEPS, SAVE)], root / "launch.log")
    assert wait_all([launch]) == [0], (root / "launch.log").read_text()[-3000:]
    return _losses(root / "run")


def _rank_pid(launch, rank: int, timeout: float = 120) -> int:
    ranks = RankProcesses(launch.pid, expected=2)
    deadline = time.monotonic() + timeout
    while rank not in ranks.pids and time.monotonic() < deadline:
        ranks.refresh()
        time.sleep(0.1)
    ranks.close()
    return ranks.pids[rank]


def _restarts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]


def _check_one_restart(run_dir: Path, log: str, reference: torch.Tensor, reason: str) -> dict:
    """Each step once with the reference's loss; the restart in restarts.jsonl, the log and the metrics.
    The fault came after step 3, so the newest checkpoint (every 2 steps) was at least step 2's."""
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    torch.testing.assert_close(_losses(run_dir), reference, rtol=1e-5, atol=0)
    [restart] = _restarts(run_dir)
    resumed, finished = restart["resumed_from"], restart["after_step"]
    assert reason in restart["reason"] and restart["restart"] == 1
    assert finished >= 3 and resumed % 2 == 0 and 2 <= resumed <= finished
    assert restart["recomputed"] == ([resumed + 1, finished] if finished > resumed else None)
    assert [r["restarts"] for r in records] == [0] * resumed + [1] * (STEPS - resumed)
    assert f"glm-launch: restart 1/1: {restart['reason']}" in log
    return restart


def _failing_start(tmp_path: Path, restarts: int) -> Start:
    """A 'launcher' that records its start in metrics.jsonl as a step and exits with status 3."""
    metrics_file = tmp_path / "metrics.jsonl"
    script = f"open({str(metrics_file)!r}, 'a').write('{{\"step\": {restarts + 1}}}\\n'); raise SystemExit(3)"
    return Start([sys.executable, "-c", script], dict(os.environ), local_ranks=0, metrics=metrics_file,
                 stall_seconds=60, summary={"world_size": 2, "layout": {"tp": 1, "pp": 1, "dp": 2}})


def test_restarts_stop_after_max_restarts_with_the_last_status(tmp_path, capsys):
    status = supervise(lambda restarts: _failing_start(tmp_path, restarts), lambda: None, 2, tmp_path)
    assert status == 3
    assert [r["after_step"] for r in _restarts(tmp_path)] == [1, 2]
    assert [r["recomputed"] for r in _restarts(tmp_path)] == [[1, 1], [1, 2]]
    out = capsys.readouterr().out
    assert "glm-launch: restart 2/2: DeepSpeed's launcher exited with status 3 after step 2; starting from step 0" in out
    assert "no restart left (--max-restarts 2)" in out


def test_too_few_devices_left_stop_with_the_reason(tmp_path):
    def plan_start(restarts: int) -> Start:
        if restarts:
            raise ConfigError("1 device(s) found, fewer than --min-devices 2: no restart")
        return _failing_start(tmp_path, restarts)

    with pytest.raises(ConfigError, match="^DeepSpeed's launcher exited with status 3; 1 device.s. found, fewer than "
                                          "--min-devices 2: no restart$"):
        supervise(plan_start, lambda: None, 1, tmp_path)


def test_sigkill_of_a_rank_restarts_from_the_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "run"
    launch = start_launch(["--nproc", "2", "--max-restarts", "1", "--",
                           *tiny_overrides(run_dir, STEPS, SAVE, "train.collective_timeout_minutes=1")],
                          tmp_path / "launch.log")
    victim = _rank_pid(launch, 1)
    wait_for_step(run_dir, 3, [launch])
    os.kill(victim, signal.SIGKILL)
    assert wait_all([launch]) == [0], (tmp_path / "launch.log").read_text()[-3000:]
    restart = _check_one_restart(run_dir, (tmp_path / "launch.log").read_text(), reference,
                                 "rank 1 was killed by SIGKILL")
    assert restart["rank"] == 1 and restart["world_size"] == 2


def test_sigstop_of_a_rank_is_a_stall_detected_within_the_timeout(reference, tmp_path):
    run_dir, timeout_minutes = tmp_path / "run", 0.3
    launch = start_launch(["--nproc", "2", "--max-restarts", "1", "--",
                           *tiny_overrides(run_dir, STEPS, SAVE, f"train.collective_timeout_minutes={timeout_minutes}")],
                          tmp_path / "launch.log")
    victim = _rank_pid(launch, 1)
    wait_for_step(run_dir, 3, [launch])
    stopped_at = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    # Detected at the timeout after the last finished step; restarts.jsonl follows the restart's planning
    # (which imports DeepSpeed: seconds on a busy 2-core machine).
    while not (run_dir / "restarts.jsonl").exists():
        assert time.monotonic() - stopped_at < timeout_minutes * 60 + 30, "the stall was not detected"
        assert launch.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
        time.sleep(0.1)
    assert wait_all([launch]) == [0], (tmp_path / "launch.log").read_text()[-3000:]
    restart = _check_one_restart(run_dir, (tmp_path / "launch.log").read_text(), reference,
                                 "no step finished for")
    assert "rank 1 stopped" in restart["reason"] and restart["rank"] == 1


def test_devices_that_shrink_to_one_continue_on_one_rank(reference, tmp_path):
    """The hostfile is re-read before the restart: it now lists one slot, so the run resumes at dp 1."""
    run_dir, hosts = tmp_path / "run", tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    launch = start_launch(["--hostfile", str(hosts), "--node-rank", "0", "--master-addr", "127.0.0.1",
                           "--max-restarts", "1", "--",
                           *tiny_overrides(run_dir, STEPS, SAVE, "train.collective_timeout_minutes=1")],
                          tmp_path / "launch.log")
    victim = _rank_pid(launch, 1)
    wait_for_step(run_dir, 3, [launch])
    hosts.write_text("localhost slots=1\n")
    os.kill(victim, signal.SIGKILL)
    assert wait_all([launch]) == [0], (tmp_path / "launch.log").read_text()[-3000:]
    log = (tmp_path / "launch.log").read_text()
    restart = _check_one_restart(run_dir, log, reference, "rank 1 was killed by SIGKILL")
    assert restart["world_size"] == 1 and restart["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert "layout:  tp 1 x pp 1 x dp 1" in log


def test_sigterm_to_glm_launch_waits_for_its_ranks_to_save_and_exits_1(tmp_path):
    """The ranks get the signal once, save the step they are in and stop; glm-launch exits (1, as documented)
    only once none of them runs, so a scheduler's immediate restart never races the old ranks."""
    import psutil

    run_dir = tmp_path / "run"
    launch = start_launch(["--nproc", "2", "--", *tiny_overrides(run_dir, 200)], tmp_path / "launch.log")
    ranks = [_rank_pid(launch, rank) for rank in (0, 1)]
    wait_for_step(run_dir, 2, [launch])
    launch.send_signal(signal.SIGTERM)
    assert wait_all([launch]) == [1], (tmp_path / "launch.log").read_text()[-3000:]
    alive = [pid for pid in ranks if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"rank processes {alive} outlived glm-launch"
    log = (tmp_path / "launch.log").read_text()
    assert "glm-launch: stopped by SIGTERM; every rank has exited" in log, log[-3000:]
    assert "second SIGTERM" not in log, log[-3000:]
    stopped_at = metrics(run_dir)[-1]["step"]
    assert 2 <= stopped_at < 200
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{stopped_at}"
