"""The rank processes DeepSpeed's launcher started on this node, watched from outside.

DeepSpeed's `launch.py` polls its children once a second, reaps the first that failed and terminates the
others; it reports no rank and exits with that child's status. To say which rank failed and how, glm-launch
reads each rank's state from /proc (Linux) while it runs: a rank that has exited is a zombie until its parent
reaps it, and a zombie's /proc/PID/stat holds its wait status (field 52, Linux >= 3.5). A pidfd per rank
(Linux >= 5.3) wakes glm-launch the moment a rank exits, well before launch.py's next poll reaps it.
"""
from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path
from typing import Optional

import psutil

_STATE, _EXIT_CODE = 0, 49  # indices of stat fields 3 and 52 after the ")" that closes the command name


def _stat(pid: int) -> Optional[list[str]]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def describe_status(status: int) -> str:
    """A waitpid status in words: 'was killed by SIGKILL', 'exited with status 2'."""
    if status & 0x7F:
        return f"was killed by {signal.Signals(status & 0x7F).name}"
    return f"exited with status {status >> 8}"


def exit_status(status: int) -> int:
    """A waitpid status as a shell reports it: the exit code, or 128 + the signal."""
    return 128 + (status & 0x7F) if status & 0x7F else status >> 8


class RankProcesses:
    """The glm-train processes below one launcher process, by global rank (their RANK variable)."""

    def __init__(self, root_pid: int, expected: int):
        self.root_pid = root_pid
        self.expected = expected
        self.pids: dict[int, int] = {}
        """global rank -> pid"""
        self._pidfds: dict[int, int] = {}
        """global rank -> pidfd, while the rank runs"""

    def refresh(self) -> None:
        """Find the ranks not yet seen: the topmost descendants with RANK in their environment (the
        compilers a rank may start inherit RANK, but their parent has it too)."""
        if len(self.pids) >= self.expected:
            return
        try:
            descendants = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            return
        with_rank = {}
        for process in descendants:
            try:
                with_rank[process.pid] = (process.ppid(), process.environ().get("RANK"))
            except psutil.Error:
                continue
        for pid, (parent, rank) in with_rank.items():
            if rank is not None and with_rank.get(parent, (None, None))[1] is None and int(rank) not in self.pids:
                self.pids[int(rank)] = pid
                try:
                    self._pidfds[int(rank)] = os.pidfd_open(pid)
                except OSError:  # already gone: failure() reads its status, or it was reaped
                    pass

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, less when a rank exits."""
        if self._pidfds:
            select.select(list(self._pidfds.values()), [], [], seconds)
        else:
            time.sleep(seconds)

    def failure(self) -> Optional[tuple[int, int]]:
        """(rank, waitpid status) of a rank that ended abnormally and is not reaped yet; None when none did."""
        for rank, pid in sorted(self.pids.items()):
            fields = _stat(pid)
            if fields and fields[_STATE] == "Z" and int(fields[_EXIT_CODE]):
                return rank, int(fields[_EXIT_CODE])
            if (not fields or fields[_STATE] == "Z") and rank in self._pidfds:  # ended well: stop waking on it
                os.close(self._pidfds.pop(rank))
        return None

    def running(self) -> bool:
        """Whether a rank process is still alive (not exited, not a zombie)."""
        return any((_stat(pid) or ["Z"])[_STATE] != "Z" for pid in self.pids.values())

    def stopped(self) -> list[int]:
        """Ranks whose process is stopped (SIGSTOP, a debugger): they make no progress and hold their peers."""
        return [rank for rank, pid in sorted(self.pids.items()) if (_stat(pid) or ["?"])[_STATE] in ("T", "t")]

    def close(self) -> None:
        for descriptor in self._pidfds.values():
            os.close(descriptor)
        self._pidfds.clear()
