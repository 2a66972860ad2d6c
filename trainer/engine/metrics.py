"""Per-step metrics: metrics.jsonl (one JSON object per optimizer step) and TensorBoard under tb/."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from torch.utils.tensorboard import SummaryWriter

from trainer.checkpoint.manifest import write_atomic

log = logging.getLogger("glm.metrics")


def step_of(line: str) -> Optional[int]:
    """The step a metrics.jsonl line records; None for a line a crash tore or garbled (not a JSON object
    with an integer step)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def cut_back(path: Path, resume_step: int) -> None:
    """Keep the lines of steps 1..resume_step (a resumed run rewrites the later ones, so the file holds one
    line per step) and drop unreadable ones, with one warning; the file is replaced atomically."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    steps = [step_of(line) for line in lines]
    kept = [line for line, step in zip(lines, steps) if step is not None and step <= resume_step]
    unreadable = steps.count(None)
    if unreadable:
        log.warning(f"warning: {path} had {unreadable} unreadable line(s) (torn or garbled by a crash), dropped; "
                    f"it keeps steps 1..{resume_step}, the checkpoint's")
    write_atomic(path, "".join(line + "\n" for line in kept))


class MetricsWriter:
    """Writes on the rank that owns the logs (global rank 0); a no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self._jsonl = None
        self._tb: Optional[SummaryWriter] = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if resume_step and path.exists():
            cut_back(path, resume_step)
        self._jsonl = open(path, "a" if resume_step else "w")
        self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict, memory: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        step = record["step"]
        for key, value in {**record, **(memory or {})}.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self._tb.add_scalar(f"train/{key}" if key not in (memory or {}) else f"memory/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
