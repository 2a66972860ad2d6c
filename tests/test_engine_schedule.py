import math

import pytest

from trainer.config import load_config
from trainer.engine.partition import blocks_per_stage, stage_layer_bounds
from trainer.engine.schedule import consumed_samples_at, global_batch_at, lr_lambda, lr_multiplier
from trainer.errors import ConfigError


def test_warmup_then_cosine_to_a_tenth():
    assert lr_multiplier(0, 10, 90, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 90, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(10, 10, 90, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 90)))
    assert lr_multiplier(54, 10, 90, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(99, 10, 90, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(500, 10, 90, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("steps, warmup", [(100, 10), (7, 0), (1, 0), (3, 2)])
def test_the_last_step_of_a_run_trains_at_the_floor(steps, warmup):
    """With decay_steps 0 (train.steps - warmup) the run's last step is at lr * min_lr_ratio, the peak is at the
    end of warmup, and the rate never rises after it."""
    config = load_config(None, [f"train.steps={steps}", f"optim.warmup_steps={warmup}", "optim.min_lr_ratio=0.1"])
    rates = [lr_lambda(config)(step) for step in range(steps)]
    assert rates[-1] == pytest.approx(0.1)
    if warmup:
        assert rates[warmup - 1] == pytest.approx(1.0)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rates[warmup:], rates[warmup + 1:]))


def test_batch_size_warmup_ramps_in_whole_increments():
    config = load_config(None, ["parallel.global_batch_size=64", "optim.batch_size_warmup_steps=4",
                                "optim.batch_size_warmup_start=16", "optim.batch_size_warmup_increment=8"])
    sizes = [global_batch_at(step, config) for step in range(6)]
    assert sizes == [16, 24, 40, 48, 64, 64]
    assert consumed_samples_at(6, config) == sum(sizes)
    assert consumed_samples_at(0, config) == 0
    config.validate(world_size=4)
    config.parallel.micro_batch_size = 3
    with pytest.raises(ConfigError, match="batch-size warmup"):
        config.check_batch_size_warmup(world_size=1)


def test_glm130b_partition_and_bounds():
    assert blocks_per_stage(70, 8) == [8, 9, 9, 9, 9, 9, 9, 8]
    assert blocks_per_stage(4, 1) == [4]
    for layers, pp in [(4, 2), (3, 3), (48, 4), (24, 3), (5, 4)]:
        blocks = blocks_per_stage(layers, pp)
        assert sum(blocks) == layers and min(blocks) >= 1 and max(blocks) - min(blocks) <= 2
        bounds = stage_layer_bounds(layers, pp)
        assert bounds[0] == 0 and bounds[-1] == layers + 3 and len(bounds) == pp + 1
    with pytest.raises(ConfigError, match="at least one block"):
        blocks_per_stage(2, 3)
