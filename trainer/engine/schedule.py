"""Learning-rate and batch-size schedules (GLM-130B: linear warmup, cosine decay to 1/10; batch warmup)."""
from __future__ import annotations

import math

from trainer.config import Config


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Factor on the peak lr for optimizer step `step` (0-based), Megatron's linear warmup and cosine decay
    evaluated at the count of steps done once this one is (step + 1):

        step < W:          (step + 1) / W                               step W - 1 at the peak
        W <= step < W + D: min + (1 - min) (1 + cos(pi (step + 1 - W) / D)) / 2   step W + D - 1 at min
        after:             min

    (W = warmup_steps, D = decay_steps, min = min_ratio): with D = train.steps - W the last step of the run
    trains at exactly lr * min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step + 1 - warmup_steps) / max(1, decay_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_steps(config: Config) -> int:
    """optim.decay_steps, or (0) the steps after warmup: the cosine ends on the run's last step."""
    return config.optim.decay_steps or max(1, config.train.steps - config.optim.warmup_steps)


def lr_lambda(config: Config):
    """The LambdaLR function of a run (a closure over the schedule settings)."""
    optim, decay = config.optim, decay_steps(config)
    return lambda step: lr_multiplier(step, optim.warmup_steps, decay, optim.min_lr_ratio)


def global_batch_at(step: int, config: Config) -> int:
    """Global batch of optimizer step `step` under batch-size warmup (Megatron's rampup): from
    batch_size_warmup_start up to global_batch_size in whole increments of batch_size_warmup_increment,
    linearly over batch_size_warmup_steps. It depends on the config only, never on the layout."""
    optim, final = config.optim, config.parallel.global_batch_size
    if optim.batch_size_warmup_steps <= 0 or step >= optim.batch_size_warmup_steps:
        return final
    start = optim.batch_size_warmup_start
    increment = optim.batch_size_warmup_increment or start
    increments = (final - start) // increment
    return start + increment * (increments * step // optim.batch_size_warmup_steps)


def consumed_samples_at(step: int, config: Config) -> int:
    """Samples consumed by steps [0, step): the data position of a resume."""
    warm = min(step, max(0, config.optim.batch_size_warmup_steps))
    return sum(global_batch_at(s, config) for s in range(warm)) + (step - warm) * config.parallel.global_batch_size
