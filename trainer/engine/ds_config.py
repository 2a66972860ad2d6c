"""The DeepSpeed JSON of a run, generated from the YAML config; a user JSON is merged over it."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.config import Config
from trainer.errors import ConfigError


TRAINER_OWNED = ("optimizer", "scheduler")
"""DeepSpeed JSON sections the trainer replaces with its own (engine/optimizer.py, engine/schedule.py)."""


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def read_user_config(path: str | Path) -> dict:
    """The user's DeepSpeed JSON (train.deepspeed_config), checked: present, valid JSON, an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"train.deepspeed_config {path} is a directory: point it at a DeepSpeed JSON file") from None
    except OSError as error:
        raise ConfigError(f"train.deepspeed_config {path} cannot be read ({error.strerror}): check its "
                          f"permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"train.deepspeed_config {path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"train.deepspeed_config {path} must hold a JSON object")
    return value


def check_user_config(config: Config, world_size: int) -> None:
    """The user JSON may not give a batch size other than the YAML's: the trainer's data order and schedule
    are built from parallel.* (a conflict would make DeepSpeed fail inside the ranks, or train another batch)."""
    user = read_user_config(config.train.deepspeed_config)
    ours = {"train_batch_size": ("parallel.global_batch_size", config.parallel.global_batch_size),
            "train_micro_batch_size_per_gpu": ("parallel.micro_batch_size", config.parallel.micro_batch_size),
            "gradient_accumulation_steps": ("the grad accumulation of parallel.*", config.grad_accum_steps(world_size))}
    for key, (source, value) in ours.items():
        if key in user and user[key] != value:
            raise ConfigError(f"train.deepspeed_config {config.train.deepspeed_config} sets {key}={user[key]!r} but "
                              f"{source} gives {value}: batch sizes come from the YAML; remove {key} from the JSON")
    for key in TRAINER_OWNED:
        if key in user:
            raise ConfigError(f"train.deepspeed_config {config.train.deepspeed_config} has an {key!r} section, which "
                              f"the trainer would not use: it builds the AdamW optimizer and LR schedule from optim.* "
                              f"(docs/CONFIG.md); remove {key!r} from the JSON and set optim.* instead")
    clip = user.get("gradient_clipping", config.optim.grad_clip)
    if clip != config.optim.grad_clip:
        raise ConfigError(f"train.deepspeed_config {config.train.deepspeed_config} sets gradient_clipping={clip!r} but "
                          f"optim.grad_clip is {config.optim.grad_clip}: clipping comes from the YAML (the trainer clips "
                          f"itself in fp32 without ZeRO); remove gradient_clipping from the JSON and set optim.grad_clip")


def effective_zero_stage(requested: int, precision: str, data_parallel: int) -> int:
    """The ZeRO stage the engine runs. ZeRO-1 partitions the optimizer states over the data-parallel
    ranks; with one data-parallel rank there is nothing to partition and DeepSpeed's stage 1 only adds
    flat-buffer gradient copies and a second fp32 copy of the weights (docs/PERFORMANCE.md), so an fp32
    run there uses stage 0 (with the Trainer's own clipping, trainer/engine/loop.py). bf16 and fp16 keep
    the stage they ask for: DeepSpeed's stage-0 bf16 optimizer does not skip a non-finite step.
    Checkpoints of either stage resume at any layout (trainer/engine/resume.py)."""
    if requested == 1 and data_parallel == 1 and precision == "fp32":
        return 0
    return requested


def zero_stage(config: Config, world_size: int) -> int:
    """effective_zero_stage of a run on `world_size` ranks, whose ZeRO partitions over DeepSpeed's data-parallel
    ranks: dp x cp (engine/ds_topology.py)."""
    layout = config.parallel.layout(world_size)
    return effective_zero_stage(config.optim.zero_stage, config.train.precision, layout.dp * layout.cp)


def uses_own_clipping(config: Config, world_size: int) -> bool:
    """fp32 without ZeRO: the trainer clips and skips non-finite steps itself (trainer/engine/build.py)."""
    return config.train.precision == "fp32" and zero_stage(config, world_size) == 0


def _offload(device: str, nvme_path: str) -> dict:
    """DeepSpeed's offload_optimizer / offload_param section for optim.offload_* = cpu | nvme."""
    section = {"device": device, "pin_memory": True}
    if device == "nvme":
        section["nvme_path"] = nvme_path
    return section


def zero_optimization(config: Config, world_size: int) -> dict:
    """The zero_optimization section: the stage, and where optimizer states and weights are offloaded."""
    optim = config.optim
    section = {"stage": zero_stage(config, world_size)}
    if optim.offload_optimizer != "none":
        section["offload_optimizer"] = _offload(optim.offload_optimizer, optim.nvme_path)
    if optim.offload_params != "none":
        section["offload_param"] = _offload(optim.offload_params, optim.nvme_path)
    return section


def zero_init_arguments(config: Config) -> dict:
    """deepspeed.zero.Init's placement of the partitioned weights while the model is built (ZeRO-3)."""
    offload = config.optim.offload_params
    return {"remote_device": None if offload == "none" else offload, "pin_memory": offload == "cpu"}


def grad_accum_dtype(config: Config, world_size: int) -> str | None:
    """"fp32" where DeepSpeed 0.19.8 accumulates a bf16 run's gradients over the micro-batches in fp32: bf16 with
    ZeRO-1 and no offload (its BF16_Optimizer, Megatron's main_grad: each micro-batch's bf16 gradient is added
    into an fp32 buffer, so 8+ micro-batches lose no more than one). Elsewhere None (DeepSpeed's default: the
    model's dtype): its stage-0 bf16 refuses an fp32 accumulation, and ZeRO-2/3 and offload keep their own
    buffers (not changed here, not measured). Nor at parallel.ep > 1: the BF16_Optimizer has no place for the
    trainer's expert groups, which ZeRO-1's own optimizer partitions over the expert-data group
    (engine/deepspeed_compat.py: zero_partitions_experts), accumulating in bf16."""
    offload = config.optim.offload_optimizer != "none" or config.optim.offload_params != "none"
    if config.parallel.ep > 1:
        return None
    if config.train.precision == "bf16" and zero_stage(config, world_size) == 1 and not offload:
        return "fp32"
    return None


def build_ds_config(config: Config, world_size: int) -> dict:
    """DeepSpeed's own settings in DeepSpeed's own shape. The optimizer and LR schedule are built by
    the trainer (engine/optimizer.py, engine/schedule.py) so their exact math is ours and tested."""
    parallel, optim, precision = config.parallel, config.optim, config.train.precision
    ds = {
        # DeepSpeed's data axis is dp x cp (engine/ds_topology.py): each cp rank of a row counts it once.
        "train_batch_size": parallel.global_batch_size * parallel.cp,
        "train_micro_batch_size_per_gpu": parallel.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps(world_size),
        # The trainer's own clipping replaces DeepSpeed's in fp32 without ZeRO (trainer/engine/build.py).
        "gradient_clipping": 0.0 if uses_own_clipping(config, world_size) else optim.grad_clip,
        "zero_optimization": zero_optimization(config, world_size),
        "steps_per_print": 10 ** 9,  # the trainer prints its own log line
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},  # the trainer measures its own tokens/s
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": precision == "bf16"},
    }
    accumulation = grad_accum_dtype(config, world_size)
    if accumulation is not None:
        ds["data_types"] = {"grad_accum_dtype": accumulation}
    if config.train.deepspeed_config:
        ds = _merge(ds, read_user_config(config.train.deepspeed_config))
    if parallel.sequence_parallel:
        # The pipeline engine would split the activation it sends between stages over the tensor ranks and
        # reassemble it on the next stage, taking it to be the same on every rank; sequence-parallel hidden states
        # are each rank's own tokens (already 1/tp of the row), so they travel whole: set after a user's JSON.
        ds["pipeline"] = {**ds.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    return ds
