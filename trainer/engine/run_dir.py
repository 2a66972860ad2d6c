"""The run directory at the start of a run: an earlier run deleted when train.overwrite asks for it, then
the resolved config and the tokenizer written beside the metrics (what they are:
trainer/checkpoint/run_record.py). Preflight has refused a fresh run into a directory holding an earlier
one unless train.resume or train.overwrite says what to do with it."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from trainer.checkpoint.manifest import write_atomic
from trainer.checkpoint.run_record import RUN_CONFIG, RUN_TOKENIZER, sha256
from trainer.config import Config, config_yaml
from trainer.parallel.comm import barrier, global_rank, world_group

RUN_OUTPUTS = ("metrics.jsonl", "tb", "checkpoints", RUN_CONFIG, RUN_TOKENIZER)
"""Everything a run writes into its run_dir: what train.overwrite deletes."""


def start_run_dir(config: Config, tokenizer: Path) -> str:
    """Prepare config.train.run_dir (rank 0 writes, every rank waits); returns the tokenizer's SHA-256, the
    fingerprint each checkpoint records. The config.yaml written says overwrite: false, so that reusing it
    as a --config never deletes this run."""
    run_dir = Path(config.train.run_dir)
    if global_rank() == 0:
        if config.train.overwrite:
            for name in RUN_OUTPUTS:
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        recorded = dataclasses.replace(config, train=dataclasses.replace(config.train, overwrite=False))
        write_atomic(run_dir / RUN_CONFIG, config_yaml(recorded))
        write_atomic(run_dir / RUN_TOKENIZER, tokenizer.read_bytes())
    barrier(world_group())
    return sha256(tokenizer)
