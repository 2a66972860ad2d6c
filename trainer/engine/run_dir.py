"""The run directory at the start of a run: owned by this run (a lock), an earlier run deleted when
train.overwrite asks for it, then the resolved config and the tokenizer written beside the metrics (what they
are: trainer/checkpoint/run_record.py). Preflight has refused a fresh run into a directory holding an earlier
one unless train.resume or train.overwrite says what to do with it; the owner checks that again under the
lock, since another run may have written there since."""
from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainer.checkpoint.manifest import write_atomic
from trainer.checkpoint.run_record import RUN_CONFIG, RUN_TOKENIZER, sha256
from trainer.config import Config, config_yaml
from trainer.checkpoint.run_record import earlier_run
from trainer.errors import ConfigError
from trainer.parallel.comm import broadcast_object, global_rank, world_group

RUN_LOCK = "run.lock"
"""run_dir/run.lock: locked (flock) by the run that owns the directory; it names its pid and host."""

RUN_OUTPUTS = ("metrics.jsonl", "tb", "checkpoints", RUN_CONFIG, RUN_TOKENIZER)
"""Everything a run writes into its run_dir: what train.overwrite deletes."""


class RunDirLock:
    """An exclusive flock on run_dir/run.lock, held by global rank 0 for the whole run. The kernel drops it when
    the process ends, however it ends (a crash, SIGKILL, a restart under glm-launch), so it is never left stuck;
    the file itself stays, naming the last owner."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / RUN_LOCK
        self._fd: Optional[int] = None
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self._fd, 256, 0).decode(errors="replace").strip() or "a process that has not said"
            self.release()
            raise ConfigError(f"train.run_dir={run_dir} is in use by another run ({owner}): wait for it to end, or "
                              f"choose another train.run_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file drops the flock
            self._fd = None

    __del__ = release  # a Trainer dropped without finishing (an exception caught in-process) frees its run_dir


@dataclass
class RunDir:
    lock: Optional[RunDirLock]
    """The lock this rank holds (global rank 0), None on the other ranks."""
    tokenizer_sha256: str
    """The fingerprint each checkpoint records."""

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def start_run_dir(config: Config, tokenizer: Path) -> RunDir:
    """Own and prepare config.train.run_dir (rank 0 locks and writes, every rank waits and learns whether it may
    go on). The config.yaml written says overwrite: false, so that reusing it as a --config never deletes this
    run."""
    run_dir = Path(config.train.run_dir)
    outcome: Optional[str] = None
    lock = None
    if global_rank() == 0:
        try:
            lock = RunDirLock(run_dir)
            _prepare(config, run_dir, tokenizer)
        except ConfigError as error:
            outcome = str(error)
    outcome = broadcast_object(outcome, world_group())  # every rank waits here for rank 0's writes
    if outcome is not None:
        if lock is not None:
            lock.release()
        raise ConfigError(outcome)
    return RunDir(lock, sha256(tokenizer))


def _prepare(config: Config, run_dir: Path, tokenizer: Path) -> None:
    """Under the lock: refuse an earlier run that appeared since preflight, delete one train.overwrite names,
    write the resolved config and the tokenizer."""
    held = earlier_run(run_dir)
    if held and not (config.train.resume or config.train.overwrite):
        raise ConfigError(f"train.run_dir={run_dir} holds an earlier run ({held}), written since this run "
                          f"started: set train.resume=true to continue it, or choose another train.run_dir")
    if config.train.overwrite:
        for name in RUN_OUTPUTS:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    recorded = dataclasses.replace(config, train=dataclasses.replace(config.train, overwrite=False))
    write_atomic(run_dir / RUN_CONFIG, config_yaml(recorded))
    write_atomic(run_dir / RUN_TOKENIZER, tokenizer.read_bytes())
