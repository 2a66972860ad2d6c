"""glm-bench: measure the GLM trainer against a bare PyTorch loop, HF GPT-2 and the ideal pipeline.

    glm-bench --config configs/glm-debug.yaml [--steps N] [--json]

The modules: batches (synthetic samples in the real format), timing (round-robin step timing),
runners (the DeepSpeed engine, the bare loop, HF GPT-2), packing (real batches of data.path, packed and
unpacked), pipeline (pp=2 in spawned processes), report (the figures and their text / JSON form), cli (the
entry point).
"""
from __future__ import annotations

from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from trainer.bench.cli import main as cli_main  # deepspeed and the model load only when the bench runs

    return cli_main(argv)
