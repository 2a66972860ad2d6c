"""The one device-to-host read of an optimizer step.

A host read of a device value (`.item()`, `float(t)`, boolean indexing) makes the host wait until the device
has run everything queued before it, so the host cannot queue the next work ahead. The step's values the host
needs (the loss, the gradient norm, the stop flag, the real tokens of its rows) are therefore handed to
StepValues as they arise, on the device, and read together, once: `read()` copies every value not read yet in
one transfer. Whoever needs a value on the host before the step ends (the trainer's own clipping decides on
the host whether the optimizer step is skipped) calls `read()` then, with what it has, and the later `read()`
of the loop finds those values read already.
"""
from __future__ import annotations

from typing import Optional

import torch

Value = Optional[torch.Tensor | float | int | bool]


class StepValues:
    """One step's values: `put` them (0-dim tensors on the device, or host numbers), `read()` them as floats."""

    def __init__(self) -> None:
        self._pending: dict[str, torch.Tensor] = {}
        self._values: dict[str, Optional[float]] = {}
        self.reads = 0
        """Reads of device values made so far (each one transfer; on a CPU run the same call copies nothing)."""

    def start(self) -> None:
        """Forget the previous step's values."""
        self._pending.clear()
        self._values.clear()

    def put(self, **values: Value) -> None:
        """Hand over values of this step; one already read this step is kept as read (the same value: the
        clipping read the loss the loop hands over again)."""
        for name, value in values.items():
            if name in self._values:
                continue
            if isinstance(value, torch.Tensor):
                self._pending[name] = value.detach().reshape(())
            else:
                self._values[name] = None if value is None else float(value)

    def read(self, **values: Value) -> dict[str, Optional[float]]:
        """put(**values), then every value of the step as a float (None where put as None), the ones still on
        the device copied in one transfer."""
        self.put(**values)
        if self._pending:
            names = list(self._pending)
            stacked = torch.stack([self._pending[name].to(torch.float64) for name in names])  # [k]
            self.reads += 1
            self._values.update(zip(names, stacked.tolist()))
            self._pending.clear()
        return dict(self._values)
