import json

import pytest

from trainer.config import load_config
from trainer.engine.ds_config import build_ds_config
from trainer.errors import ConfigError


def test_generated_from_the_yaml():
    config = load_config("configs/glm-debug.yaml", ["train.precision=bf16", "optim.grad_clip=0.5",
                                                    "parallel.micro_batch_size=2", "parallel.global_batch_size=8"])
    ds = build_ds_config(config, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"] == {"stage": 1}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False


def test_fp16_has_dynamic_loss_scaling():
    ds = build_ds_config(load_config("configs/glm-debug.yaml", ["train.precision=fp16"]), world_size=1)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic


def test_a_user_json_is_merged_over_it(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 0, "reduce_bucket_size": 1000}, "wall_clock_breakdown": True}))
    config = load_config("configs/glm-debug.yaml", [f"train.deepspeed_config={user}"])
    ds = build_ds_config(config, world_size=1)
    assert ds["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 1000} and ds["wall_clock_breakdown"] is True
    assert ds["train_batch_size"] == config.parallel.global_batch_size


def test_a_bad_user_json_is_one_clear_error(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(load_config("configs/glm-debug.yaml", [f"train.deepspeed_config={bad}"]), world_size=1)


@pytest.mark.parametrize("precision, tp, world_size, stage", [
    ("fp32", 1, 1, 0),  # one data-parallel rank: nothing to partition
    ("fp32", 2, 2, 0),  # tp=2 on two ranks is still dp=1
    ("fp32", 1, 2, 1),  # dp=2 partitions the optimizer states
    ("bf16", 1, 1, 1),  # DeepSpeed's stage-0 bf16 optimizer would not skip non-finite steps
    ("fp16", 1, 1, 1),
])
def test_zero_1_runs_as_stage_0_without_data_parallelism_in_fp32(precision, tp, world_size, stage):
    config = load_config("configs/glm-debug.yaml", [f"train.precision={precision}", f"parallel.tp={tp}",
                                                    "parallel.global_batch_size=8"])
    assert config.optim.zero_stage == 1
    assert build_ds_config(config, world_size)["zero_optimization"] == {"stage": stage}
