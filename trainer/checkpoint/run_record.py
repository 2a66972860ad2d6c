"""What makes a run directory and each of its checkpoints self-describing, read by the offline tools
(convert, export, generate, eval) and by preflight without the run's --config:

    run_dir/config.yaml                  the resolved config of the newest start (file + every --set, the
                                         vocabulary filled in): loads as a --config
    run_dir/tokenizer.json               the run's tokenizer, copied at the start
    run_dir/checkpoints/global_stepN/run.json
        {"model": every ModelConfig field, "layout": {"tp", "pp", "dp"}, "tokenizer_sha256": ...}
    run_dir/checkpoints/global_stepN/data_position.json   where the data order resumes

A checkpoint written before run.json held the whole model config records only the shape keys: such a
checkpoint still needs the run's --config, and is checked against it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

from trainer.errors import CheckpointError, ConfigError
from trainer.model.config import SHAPE_KEYS, ModelConfig

RUN_RECORD = "run.json"
DATA_POSITION = "data_position.json"
"""The packing plan's scan state at a checkpoint's next row (trainer/data/packing.py), from rank 0."""
RUN_CONFIG = "config.yaml"
RUN_TOKENIZER = "tokenizer.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def run_record(model: ModelConfig, layout: dict, tokenizer_sha256: Optional[str]) -> dict:
    """The record a checkpoint stores beside its weights."""
    return {"model": dataclasses.asdict(model), "layout": layout, "tokenizer_sha256": tokenizer_sha256}


def read_run_record(tag_dir: Path) -> Optional[dict]:
    """A checkpoint's record, or None for a checkpoint saved without one."""
    path = tag_dir / RUN_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): the checkpoint is damaged") from None


def recorded_model(record: Optional[dict]) -> Optional[ModelConfig]:
    """The whole ModelConfig a record holds; None when it holds only the shape keys (or there is none)."""
    model = (record or {}).get("model", {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if not known - set(SHAPE_KEYS) <= set(model):
        return None
    return ModelConfig.from_dict(model)


def check_shape(given: Optional[ModelConfig], recorded: dict, source: str, fix: str) -> None:
    """Refuse a given config (the user's --config) whose shape keys differ from those a source records, naming
    each key."""
    differences = given.shape_differences(recorded) if given is not None else []
    if differences:
        raise ConfigError(f"--config does not match {source} ({'; '.join(differences)}): {fix}")


def checkpoint_model(tag_dir: Path, given: Optional[ModelConfig]) -> ModelConfig:
    """The model config a training checkpoint was written with. A `given` config (the user's --config) must
    agree with the recorded shape and then wins, so its non-shape switches (dropout, compile) apply."""
    record = read_run_record(tag_dir)
    if given is not None:
        check_shape(given, (record or {}).get("model", {}), f"the checkpoint {tag_dir}",
                    f"pass the run's own config ({tag_dir.parent.parent / RUN_CONFIG}) or none")
        return given
    model = recorded_model(record)
    if model is None:
        raise ConfigError(f"{tag_dir} was saved before checkpoints recorded their model: pass the run's --config "
                          f"(and its --set overrides)")
    return model


def run_tokenizer(tag_dir: Path) -> Optional[Path]:
    """The tokenizer of the run a checkpoint belongs to (run_dir/tokenizer.json), checked against the
    fingerprint the checkpoint recorded; None when the run dir holds none."""
    path = tag_dir.parent.parent / RUN_TOKENIZER
    if not path.is_file():
        return None
    expected = (read_run_record(tag_dir) or {}).get("tokenizer_sha256")
    if expected and sha256(path) != expected:
        raise CheckpointError(f"{path} is not the tokenizer {tag_dir.name} was trained with (its SHA-256 differs "
                              f"from the one in {tag_dir / RUN_RECORD}): pass the right one with --tokenizer")
    return path


def earlier_run(run_dir: Path) -> Optional[str]:
    """What of an earlier run `run_dir` holds (its metrics or checkpoints), or None when it holds none."""
    checkpoints = run_dir / "checkpoints"
    held = [name for name, present in (
        ("metrics.jsonl", (run_dir / "metrics.jsonl").is_file()),
        ("checkpoints", checkpoints.is_dir() and any(checkpoints.iterdir()))) if present]
    return " and ".join(held) or None
