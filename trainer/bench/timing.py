"""Step timing that survives a shared machine: the contenders take turns, one step each per round.

A load spike from another process then hits every contender in the same round instead of one of
them, and the ratio of two contenders is taken per round (same moment, same load) and summarised by
its median and range.
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from deepspeed.accelerator import get_accelerator

try:
    import resource
except ImportError:  # Windows
    resource = None


@dataclass
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high}


def timed(step: Callable[[], object]) -> float:
    """Wall seconds of one call, the accelerator's queued work included."""
    accelerator = get_accelerator()
    accelerator.synchronize()
    start = time.perf_counter()
    step()
    accelerator.synchronize()
    return time.perf_counter() - start


@dataclass
class Timings:
    """Per call: wall seconds, this process's CPU seconds (all its threads), which other tenants of a
    shared CPU do not inflate the way they inflate wall time, and the minor page faults of the call (the
    host allocator handing freed memory back to the kernel and faulting it in again; see
    docs/PERFORMANCE.md)."""
    wall: list[float]
    cpu: list[float]
    faults: list[int] = field(default_factory=list)

    def __add__(self, other: "Timings") -> "Timings":
        return Timings(self.wall + other.wall, self.cpu + other.cpu, self.faults + other.faults)


def minor_faults() -> int:
    """This process's minor page faults so far (0 where the platform does not count them)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """The order of the contenders in each round: all n! orders in turn (glm-bench times pairs: e b, b e, ...).
    Each contender then runs in every position equally often, and right after each other contender
    equally often within a round, so what a step leaves behind (a freed heap, cold caches) costs every
    contender alike. (Rotating one order would not: in e b h | b h e | h e b, b always follows e.)"""
    orders = [list(order) for order in itertools.permutations(names)]
    return [orders[r % len(orders)] for r in range(rounds)]


def round_robin(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, Timings]:
    """Every step once per round for `rounds` rounds, in the orders of round_orders -> its timings, by name."""
    timings = {name: Timings([], []) for name in steps}
    for order in round_orders(list(steps), rounds):
        for name in order:
            cpu_start, faults_start = time.process_time(), minor_faults()
            timings[name].wall.append(timed(steps[name]))
            timings[name].cpu.append(time.process_time() - cpu_start)
            timings[name].faults.append(minor_faults() - faults_start)
    return timings


def per_round_ratio(numerator: list[float], denominator: list[float]) -> Spread:
    """numerator[i] / denominator[i] for every round i: median, min and max."""
    return Spread.of([a / b for a, b in zip(numerator, denominator)])


def peak_memory_of(step: Callable[[], object], calls: int) -> tuple[float, int]:
    """Run `step` `calls` times (the warm-up) after resetting the accelerator's peak counter ->
    (seconds of the last call, peak bytes). On CPU DeepSpeed's accelerator reports the process's
    resident set size, sampled when asked: an upper bound that includes the Python runtime."""
    accelerator = get_accelerator()
    accelerator.reset_peak_memory_stats()
    last = 0.0
    for _ in range(calls):
        last = timed(step)
        accelerator.memory_allocated()  # on CPU this samples the resident set into the peak
    return last, int(accelerator.max_memory_allocated())
