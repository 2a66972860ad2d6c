"""Everything checked before a process group starts: a bad run fails in a second with one line that
says what to change, and writes nothing. preflight() returns the resolved config (the vocabulary filled
in from the tokenizer), which the trainer and every tool take as it is.

It runs once per start: in glm-launch, before any rank exists (each rank then reads the resolved config
glm-launch wrote and checks only its own device, check_device), or in glm-train run on its own."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from trainer.checkpoint.tags import resume_tag, step_of
from trainer.checkpoint.run_record import earlier_run, read_run_record
from trainer.config import Config
from trainer.engine.ds_config import check_user_config
from trainer.errors import ConfigError
from trainer.paths import nearest_existing, uncreatable_directory

# Bytes per parameter in a checkpoint: fp32 weights plus Adam's two fp32 moments; half precision adds
# the half copy of the weights that DeepSpeed stores beside the fp32 master.
CHECKPOINT_BYTES_PER_PARAM = {"fp32": 12, "bf16": 14, "fp16": 14}


def check_run_dir(config: Config) -> None:
    run_dir = Path(config.train.run_dir)
    problem = uncreatable_directory(run_dir)
    if problem:
        raise ConfigError(f"train.run_dir={run_dir} cannot be used: {problem}; choose a directory you can write to")
    held = earlier_run(run_dir)
    if held and not (config.train.resume or config.train.overwrite):
        raise ConfigError(f"train.run_dir={run_dir} holds an earlier run ({held}): set train.resume=true to continue "
                          f"it, train.overwrite=true to delete it and start afresh, or choose another train.run_dir")
    if config.train.resume and resume_tag(run_dir / "checkpoints") is None:
        raise ConfigError(f"train.resume=true but {run_dir / 'checkpoints'} holds no checkpoint: "
                          f"train without resume first, or point train.run_dir at a run that saved one")
    if config.train.resume:
        check_steps_left(run_dir / "checkpoints", config.train.steps)


def check_resume_shape(config: Config) -> None:
    """A resume whose model shape differs from the newest checkpoint's is refused, naming the keys (the
    weights would not load). Checkpoints written before the run record existed are not checked here."""
    checkpoint_dir = Path(config.train.run_dir) / "checkpoints"
    tag_dir = checkpoint_dir / resume_tag(checkpoint_dir)
    differences = config.model.shape_differences((read_run_record(tag_dir) or {}).get("model", {}))
    if differences:
        raise ConfigError(f"train.resume: {tag_dir} holds another model ({'; '.join(differences)}): resume "
                          f"with the run's model config, or train into a new train.run_dir")


def check_steps_left(checkpoint_dir: Path, steps: int) -> None:
    """A resume with train.steps (the total) at or below the newest checkpoint's step would do nothing."""
    tag = resume_tag(checkpoint_dir)
    step = None if tag is None else step_of(tag)
    if step is not None and step >= steps:
        raise ConfigError(f"the newest checkpoint in {checkpoint_dir} is at step {step}, and "
                          f"train.steps={steps} is the total to train: nothing is left; raise train.steps "
                          f"above {step}")


def check_disk_space(config: Config) -> None:
    """Room for one checkpoint (weights and Adam states) on the run directory's file system."""
    needed = config.model.num_parameters(config.parallel.tp) * CHECKPOINT_BYTES_PER_PARAM[config.train.precision]
    anchor = nearest_existing(Path(config.train.run_dir))
    usage = shutil.disk_usage(anchor)
    if usage.total == 0:
        raise ConfigError(f"train.run_dir={config.train.run_dir} is on {anchor}, a file system without storage (like "
                          f"/proc or /sys): choose a directory on a disk")
    if usage.free < needed:
        raise ConfigError(f"train.run_dir has {_size(usage.free)} free but one checkpoint needs about {_size(needed)}: "
                          f"free space or move train.run_dir")


def check_memory(config: Config) -> None:
    """Refuse, before anything is allocated, a run whose lower bound of memory per rank exceeds this device's:
    the weights (this rank's share, in fp32) and the fp32 logits of one micro-batch, which the loss holds at
    once. The real need is higher (gradients, Adam, activations: launch/memory.py); this bound only catches
    sizes that cannot fit at all, which would otherwise end in the kernel's OOM killer without a message."""
    from deepspeed.accelerator import get_accelerator

    m, p = config.model, config.parallel
    weights = 4 * m.num_parameters(p.tp) // p.pp
    logits = 4 * p.micro_batch_size * config.data.seq_length * (m.padded_vocab_size(p.tp) // p.tp)
    available = get_accelerator().total_memory()
    if weights + logits > available:
        raise ConfigError(f"one rank needs at least {_size(weights + logits)} ({_size(weights)} of weights, "
                          f"{_size(logits)} of logits for parallel.micro_batch_size={p.micro_batch_size} x "
                          f"data.seq_length={config.data.seq_length}) but this device has {_size(available)}: lower "
                          f"parallel.micro_batch_size or data.seq_length, or spread the model with parallel.tp / pp")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def check_device(config: Config) -> None:
    """The chosen precision must exist on this process's accelerator (DeepSpeed has no fp16 on CPU): checked
    where the rank runs, since glm-launch may plan CPU ranks from a GPU machine."""
    from deepspeed.accelerator import get_accelerator

    accelerator, precision = get_accelerator(), config.train.precision
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[precision]:
        usable = ", ".join(p for p, ok in supported.items() if ok)
        raise ConfigError(f"train.precision={precision} is not supported on this device "
                          f"({accelerator.device_name()}): use one of {usable}")


def with_vocab(config: Config, vocab: int) -> Config:
    """The config with model.vocab_size taken from the tokenizer (when 0), after checking that a configured
    one can hold the tokenizer's ids."""
    if config.model.vocab_size == 0:
        return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
    if config.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {vocab} "
                          f"tokens: set model.vocab_size to 0 (take it from the tokenizer) or >= {vocab}")
    return config


def check_data(config: Config) -> Config:
    """Data and tokenizer files present and usable; returns the config with the vocabulary resolved."""
    # Lazy: the datasets import torch; glm-launch and glm-train import this module and answer --help and
    # config errors without it.
    from trainer.data.dataset import check_data_files

    return with_vocab(config, check_data_files(config.data))


def preflight(config: Config, world_size: int) -> Config:
    """Validate the config, the layout, the files and the disk (raise ConfigError / DataError); returns the
    resolved config. The device is check_device's."""
    config.validate(world_size)
    return check_outside(config, world_size)


def check_outside(config: Config, world_size: int) -> Config:
    """preflight() for a config already validated at this world size (glm-launch validates its plan itself):
    the DeepSpeed JSON, the run directory, the data, the resume's shape and the disk; returns the resolved config."""
    if config.train.deepspeed_config:
        check_user_config(config, world_size)
    check_run_dir(config)
    config = check_data(config)
    config.model.validate(config.parallel.tp)
    if config.train.resume:
        check_resume_shape(config)
    check_disk_space(config)
    check_memory(config)
    return config
