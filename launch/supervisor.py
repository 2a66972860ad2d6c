"""Start DeepSpeed's launcher, watch it, and restart the job after a failure (glm-launch --max-restarts).

A failure is a rank that ended abnormally (launch/ranks.py names it), DeepSpeed's launcher exiting non-zero,
or a stall: no step finished for train.collective_timeout_minutes. Progress is a write to metrics.jsonl,
which global rank 0 appends to after every step, so stalls are watched only by the glm-launch that runs
rank 0; the clock starts when the ranks open that file, after start-up and loading the checkpoint. On a
failure every rank of this node is killed at once: SIGKILL to the launcher's process group, the one signal a stopped rank obeys, and
nothing is lost that the newest checkpoint does not hold. Then, while restarts are left, the caller plans
the next start (devices discovered again) and the ranks resume from the newest complete checkpoint.

A SIGTERM or SIGINT to glm-launch goes to this node's ranks, once each (a second one would make a rank exit
at once, without saving: DeepSpeed's launcher passes a signal it gets on to the ranks again, so it is not
signalled itself); to the launcher's whole process group only while the ranks are not known yet, or when
they run on other nodes. The ranks save and stop, and glm-launch waits for them, up to
train.collective_timeout_minutes, before it kills what is left and exits INTERRUPTED: a scheduler that
restarts the job at once never meets a rank of the old one. Nothing is restarted.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from launch.ranks import RankProcesses, describe_status, exit_status
from trainer.errors import GLMError

POLL_SECONDS = 0.05
"""How often the launcher's exit and the progress are checked (a rank's exit wakes glm-launch at once)."""
INTERRUPTED = 1
"""glm-launch's exit status after a SIGTERM or SIGINT (once its ranks are gone)."""
RESTARTS_LOG = "restarts.jsonl"
"""One JSON object per restart in train.run_dir, written by the glm-launch that runs global rank 0."""


@dataclass(frozen=True)
class Start:
    """Everything one start of the ranks needs, planned for the devices found at that moment."""

    command: list[str]
    env: dict
    local_ranks: int
    """glm-train processes DeepSpeed's launcher starts on this node (0 when it starts them over ssh)."""
    metrics: Optional[Path]
    """metrics.jsonl when global rank 0 runs on this node (stalls are watched), else None."""
    stall_seconds: float
    summary: dict
    """The devices and the layout of this start, for the restart log."""


@dataclass(frozen=True)
class Outcome:
    status: int
    failure: Optional[str]
    """Why the ranks stopped ('rank 1 was killed by SIGKILL', 'no step finished for ...'); None on success."""
    rank: Optional[int]
    interrupted: bool
    """glm-launch itself was signalled: the run stops here."""


class _ForwardSignals:
    """SIGTERM / SIGINT to glm-launch -> the same signal to each rank of this node once they are all known,
    else to the launcher's whole process group (see the module docstring)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, group: int, ranks: RankProcesses):
        self.group, self.ranks, self.received, self._previous = group, ranks, None, {}

    def __enter__(self) -> "_ForwardSignals":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        known = len(self.ranks.pids) >= self.ranks.expected > 0
        for pid in list(self.ranks.pids.values()) if known else []:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if not known:
            try:
                os.killpg(self.group, signum)
            except ProcessLookupError:
                pass


class _Progress:
    """Seconds since metrics.jsonl was last written in this start; 0 until the ranks first write it (they open
    it once the engine is built and any checkpoint loaded, so start-up is not timed here: the rendezvous has
    its own timeout). The file's own time, not when glm-launch noticed, so a stall fires before rank 0's
    collective timeout, which starts after the write."""

    def __init__(self, path: Optional[Path]):
        self.path, self.started = path, time.time()

    def idle_seconds(self) -> float:
        try:
            written = self.path.stat().st_mtime if self.path else 0.0
        except OSError:
            return 0.0
        return time.time() - written if written >= self.started else 0.0


def _kill_group(process: subprocess.Popen, ranks: RankProcesses) -> None:
    """SIGKILL the launcher's process group and wait until the ranks are gone (their ports and files free)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ranks.running():
        time.sleep(POLL_SECONDS)


def _group_alive(group: int) -> bool:
    """Whether a process of the process group `group` still runs (zombies aside): ranks outlive DeepSpeed's
    launcher when it dies of the signal."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def _stopped_by_signal(process: subprocess.Popen, ranks: RankProcesses, signals: _ForwardSignals,
                       deadline: float) -> Optional[Outcome]:
    """After a SIGTERM / SIGINT: the outcome once every process of the launch is gone, or once the grace
    period is over (what is left is killed); None while the ranks are still saving."""
    if process.poll() is None and time.monotonic() < deadline:
        return None
    if (ranks.running() or _group_alive(process.pid)) and time.monotonic() < deadline:
        return None
    left = ranks.running() or _group_alive(process.pid)
    _kill_group(process, ranks)
    return Outcome(INTERRUPTED, f"stopped by {signals.received}" + (
        ": the ranks still running after train.collective_timeout_minutes were killed" if left else ""),
        None, True)


def run_once(start: Start) -> Outcome:
    """Run the launcher until it exits, a rank fails, the ranks stall or, after a signal, every rank is gone."""
    print(f"starting: {' '.join(start.command)}", flush=True)
    process = subprocess.Popen(start.command, env=start.env, start_new_session=True)
    ranks, progress = RankProcesses(process.pid, start.local_ranks), _Progress(start.metrics)
    deadline = None
    try:
        with _ForwardSignals(process.pid, ranks) as signals:
            while True:
                status = process.poll()
                ranks.refresh()
                failed = ranks.failure()
                if failed is not None:
                    _kill_group(process, ranks)
                    rank, wait_status = failed
                    return Outcome(exit_status(wait_status), f"rank {rank} {describe_status(wait_status)}", rank,
                                   signals.received is not None)
                if signals.received:
                    deadline = deadline or time.monotonic() + start.stall_seconds
                    stopped = _stopped_by_signal(process, ranks, signals, deadline)
                    if stopped is not None:
                        return stopped
                    ranks.wait(POLL_SECONDS)
                    continue
                stalled = None if status is not None else _stall(ranks, progress.idle_seconds(), start.stall_seconds)
                if stalled is not None:
                    _kill_group(process, ranks)
                    return Outcome(1, stalled[1], stalled[0], False)
                if status is not None:
                    failure = f"DeepSpeed's launcher exited with status {status}" if status else None
                    return Outcome(status, failure, None, False)
                ranks.wait(POLL_SECONDS)
    except BaseException:  # glm-launch itself failing must not leave the ranks running
        _kill_group(process, ranks)
        raise
    finally:
        ranks.close()


def _stall(ranks: RankProcesses, idle: float, limit: float) -> Optional[tuple[Optional[int], str]]:
    """(the stopped rank if there is exactly one, why) once no step has finished for `limit` seconds."""
    if idle <= limit:
        return None
    stopped = ranks.stopped()
    why = f"no step finished for {idle / 60:.2f} minutes (train.collective_timeout_minutes)"
    if stopped:
        why += f"; rank {', '.join(map(str, stopped))} stopped (SIGSTOP or a debugger)"
    return (stopped[0] if len(stopped) == 1 else None), why


def _steps(metrics: Path) -> Optional[int]:
    """The last step metrics.jsonl records (None: no step yet); a line the failure tore is skipped."""
    from trainer.engine.metrics import step_of

    try:
        steps = [step_of(line) for line in metrics.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    return max((step for step in steps if step is not None), default=None)


def supervise(plan_start: Callable[[int], Start], resumable_step: Callable[[], Optional[int]],
              max_restarts: int, run_dir: Path) -> int:
    """Start, and after each failure while restarts are left, start again; returns the exit status.

    plan_start(restarts) discovers the devices and plans a start (restarts > 0: resuming); resumable_step()
    is the step of the newest complete checkpoint, or None."""
    start = plan_start(0)
    restarts = 0
    while True:
        outcome = run_once(start)
        if outcome.interrupted:
            print(f"glm-launch: {outcome.failure}; every rank has exited (those that saved: resume with --set "
                  f"train.resume=true)", flush=True)
            return INTERRUPTED
        if outcome.failure is None:
            return outcome.status
        if restarts == max_restarts:
            left = f"; no restart left (--max-restarts {max_restarts})" if max_restarts else ""
            print(f"glm-launch: {outcome.failure}{left}", flush=True)
            return outcome.status if outcome.status > 0 else 1
        restarts += 1
        finished = _steps(start.metrics) if start.metrics else None
        resumed = resumable_step()
        try:
            start = plan_start(restarts)
        except GLMError as error:  # e.g. fewer devices left than --min-devices
            raise type(error)(f"{outcome.failure}; {error}") from error
        _record(start, restarts, max_restarts, outcome, finished, resumed, run_dir)


def _record(start: Start, restarts: int, max_restarts: int, outcome: Outcome, finished: Optional[int],
            resumed: Optional[int], run_dir: Path) -> None:
    """The restart in glm-launch's log and, where rank 0 runs, in run_dir/restarts.jsonl."""
    first = (resumed or 0) + 1
    recomputed = [first, finished] if finished is not None and finished >= first else None
    record = {"restart": restarts, "rank": outcome.rank, "reason": outcome.failure, "after_step": finished,
              "resumed_from": resumed, "recomputed": recomputed, **start.summary}
    where = f"after step {finished}" if finished is not None else "before the first step"
    again = f"resuming from step {resumed}" if resumed is not None else "starting from step 0"
    if recomputed:
        again += f", step{'s' * (recomputed[0] != recomputed[1])} {'-'.join(map(str, sorted(set(recomputed))))} recomputed"
    devices = start.summary["world_size"]
    print(f"glm-launch: restart {restarts}/{max_restarts}: {outcome.failure} {where}; {again}; on {devices} "
          f"device{'s' * (devices != 1)}", flush=True)
    if start.metrics is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / RESTARTS_LOG, "a") as log:
            log.write(json.dumps(record) + "\n")
