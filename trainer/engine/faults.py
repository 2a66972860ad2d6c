"""Preemption and numerical faults: what a long run needs to end cleanly instead of dying.

- SIGTERM / SIGINT (SLURM sends SIGTERM before it kills a job): the step in flight finishes, every rank
  agrees to stop at the same step, a checkpoint is saved and the run exits 0. A second signal exits at once.
- A non-finite loss or gradient norm: the optimizer step is skipped (DeepSpeed's overflow path, or ours
  where DeepSpeed has none), counted and logged; too many in a row stop the run with a checkpoint of the
  last good state. The environment variable GLM_INJECT_NAN_STEPS (a test hook, not a config key) poisons
  the loss of chosen steps to test exactly that.
"""
from __future__ import annotations

import math
import os
import signal
import sys
from typing import Callable, Optional

import torch

from trainer.errors import ConfigError, GLMError
from trainer.parallel.comm import max_over_ranks, world_group

INJECT_NAN_STEPS = "GLM_INJECT_NAN_STEPS"
"""Fault injection for tests: comma-separated (1-based) steps whose loss is made NaN, e.g. `3,4`."""


class TrainingFault(GLMError):
    """The run cannot continue (a fault it was told not to tolerate); a checkpoint was saved first."""


class PreemptionHandler:
    """Turns the first SIGTERM/SIGINT into a request to stop after the current step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "PreemptionHandler":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            print(f"rank {os.environ.get('RANK', '0')}: second {signal.Signals(signum).name}, exiting now",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"rank {os.environ.get('RANK', '0')}: {signal.Signals(signum).name} received: finishing this step, "
              f"saving a checkpoint and exiting (send it again to exit at once)", file=sys.stderr, flush=True)

    def stop_flag(self, device) -> bool | torch.Tensor:
        """Whether any rank was signalled, the same on every rank: with one process the host's own flag (no
        collective); else a 0-dim tensor on the device, the flags' maximum over every rank (a collective: call
        it on all ranks each step), left unread so that it is read with the step's other values
        (trainer/engine/step_values.py)."""
        group = world_group()
        if group is None:
            return self.received is not None
        return max_over_ranks(self.received is not None, device, group=group)


class NonFiniteSteps:
    """Counts skipped steps and stops the run after `limit` in a row (0 = never stop)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, skipped: bool) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += int(skipped)

    @property
    def exceeded(self) -> bool:
        return self.limit > 0 and self.in_a_row > self.limit


def is_finite(value: Optional[float]) -> bool:
    return value is None or math.isfinite(value)


def injected_nan_steps() -> set[int]:
    """The steps GLM_INJECT_NAN_STEPS names (none without it); a malformed value is a ConfigError."""
    text = os.environ.get(INJECT_NAN_STEPS, "").strip()
    steps = [part.strip() for part in text.split(",")] if text else []
    if not all(step.isdigit() and int(step) >= 1 for step in steps):
        raise ConfigError(f"{INJECT_NAN_STEPS}={text!r} must be comma-separated step numbers >= 1, e.g. 3,4")
    return {int(step) for step in steps}


class PoisonedLoss(torch.nn.Module):
    """Fault injection: the loss of the chosen (1-based) optimizer steps is NaN, everything else untouched."""

    def __init__(self, loss_fn: torch.nn.Module, poisoned_steps: set[int], current_step: Callable[[], int]):
        super().__init__()
        self.loss_fn = loss_fn
        self.poisoned_steps = poisoned_steps
        self.current_step = current_step

    def forward(self, outputs, labels) -> torch.Tensor:
        loss = self.loss_fn(outputs, labels)
        return loss * float("nan") if self.current_step() in self.poisoned_steps else loss
