"""Per-step metrics: metrics.jsonl (one JSON object per optimizer step) and TensorBoard under tb/."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch.utils.tensorboard import SummaryWriter


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
            # A resumed run rewrites the steps after its checkpoint, so the file holds one line per step.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
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
