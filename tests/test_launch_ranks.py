"""The rank processes seen from outside: found by their RANK variable below the launcher, a stopped one
named, and a killed one's status read from /proc before its parent reaps it."""
import os
import signal
import subprocess
import sys
import time

import psutil

from launch.ranks import RankProcesses, describe_status, exit_status

# A stand-in for DeepSpeed's launch.py: two "ranks" with RANK set, each starting a child that inherits RANK
# (as a compiler started by a rank does), reaped only when the parent is killed.
PARENT = """
import os, subprocess, sys, time
child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
ranks = [subprocess.Popen([sys.executable, "-c", child], env={**os.environ, "RANK": str(r)}) for r in range(2)]
time.sleep(60)
"""


def test_a_killed_rank_is_named_with_its_signal_and_a_stopped_one_is_seen():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True,
                              env={k: v for k, v in os.environ.items() if k != "RANK"})
    ranks = RankProcesses(parent.pid, expected=2)
    try:
        deadline = time.monotonic() + 30
        while len(ranks.pids) < 2 and time.monotonic() < deadline:
            ranks.refresh()
            time.sleep(0.05)
        assert sorted(ranks.pids) == [0, 1]
        assert all(psutil.Process(pid).ppid() == parent.pid for pid in ranks.pids.values())  # not their children
        assert ranks.failure() is None and ranks.stopped() == []
        os.kill(ranks.pids[0], signal.SIGSTOP)
        time.sleep(0.2)
        assert ranks.stopped() == [0]
        os.kill(ranks.pids[1], signal.SIGKILL)
        ranks.wait(5)  # the pidfd wakes at the exit
        assert ranks.failure() == (1, signal.SIGKILL)  # the wait status of a kill: the signal's number
    finally:
        ranks.close()
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_wait_statuses_in_words_and_as_exit_statuses():
    assert (describe_status(9), exit_status(9)) == ("was killed by SIGKILL", 137)
    assert (describe_status(2 << 8), exit_status(2 << 8)) == ("exited with status 2", 2)
