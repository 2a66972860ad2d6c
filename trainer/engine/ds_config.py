"""The DeepSpeed JSON of a run, generated from the YAML config; a user JSON is merged over it."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.config import Config
from trainer.errors import ConfigError


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def read_user_config(path: str | Path) -> dict:
    """The user's DeepSpeed JSON (train.deepspeed_config), checked: present, valid JSON, an object."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"train.deepspeed_config {path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"train.deepspeed_config {path} must hold a JSON object")
    return value


def build_ds_config(config: Config, world_size: int) -> dict:
    """DeepSpeed's own settings in DeepSpeed's own shape. The optimizer and LR schedule are built by
    the trainer (engine/optimizer.py, engine/schedule.py) so their exact math is ours and tested."""
    parallel, optim, precision = config.parallel, config.optim, config.train.precision
    ds = {
        "train_batch_size": parallel.global_batch_size,
        "train_micro_batch_size_per_gpu": parallel.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps(world_size),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": optim.zero_stage},
        "steps_per_print": 10 ** 9,  # the trainer prints its own log line
        "wall_clock_breakdown": False,
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": precision == "bf16"},
    }
    if config.train.deepspeed_config:
        ds = _merge(ds, read_user_config(config.train.deepspeed_config))
    return ds
