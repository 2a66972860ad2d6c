"""The run configuration: one dataclass per concern, loaded from YAML, overridden by `--set`.

Precedence: dataclass defaults < the YAML file < `--set section.key=value` (last one wins).
Every key is checked against the dataclasses; an unknown key names the nearest valid one.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from trainer.data.config import DataConfig
from trainer.errors import ConfigError, read_user_text
from trainer.model.config import ModelConfig
from trainer.parallel.mesh import Layout

PRECISIONS = ("fp32", "bf16", "fp16")
MAX_SEED = 2 ** 63
"""Seeds are offset per pipeline stage and tensor rank and fed to torch (64-bit) and numpy generators."""
MAX_TIMEOUT_MINUTES = 525600
"""A year: the longest collective timeout accepted (Python's timedelta overflows far above it)."""
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (inside a node)."""
    pp: int = 1
    """Pipeline-parallel size (number of stages). Data parallel is world_size / (pp * cp * tp)."""
    cp: int = 1
    """Context-parallel size: ranks that split each row between them, in 2 cp load-balanced chunks (rank r: chunk
    r and chunk 2 cp - 1 - r), attention all-gathering the row's keys and values. data.seq_length must be a
    multiple of 2 * cp (docs/TRAINING.md, "Context parallelism")."""
    ep: int = 1
    """Expert-parallel size: ranks that split each MoE layer's routed experts between them (rank r of ep holds
    the r-th block of moe_num_experts / ep), taken from the dp * cp ranks, so it must divide dp * cp and
    model.moe_num_experts (docs/TRAINING.md: the rank rule). fp32 without ZeRO, or ZeRO-1/2 in any precision
    (pp = 1, no optimizer offload); not ZeRO-3."""
    micro_batch_size: int = 1
    """Samples per micro-batch on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks = micro_batch * grad_accum * dp."""
    recompute_interval: int = 0
    """Activation recomputation (what DeepSpeed and Megatron call activation checkpointing): keep only the input
    of every this many blocks and recompute the rest in backward (0 = off)."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism, with tp > 1: outside attention and the MLP (the embedding output, norms,
    dropout, residual adds) each tensor rank holds data.seq_length / tp tokens of every row instead of all of
    them, which divides those activations by tp at the same communication volume (all-gather before the
    column-parallel layers, reduce-scatter after the row-parallel ones: docs/TRAINING.md). data.seq_length must
    be divisible by tp. Training only: glm-generate and glm-eval decode without it. glm-launch turns it on
    wherever its plan has tp > 1, on a dense model (a mixture-of-experts model takes it when set)."""

    def layout(self, world_size: int) -> Layout:
        """The run's layout on world_size ranks (dp = world_size / (pp * cp * tp) and the ep rule: trainer/parallel/
        mesh.py); a ConfigError naming the keys to change when the sizes do not fit."""
        try:
            layout = Layout.of_world(world_size, tp=self.tp, pp=self.pp, cp=self.cp)
        except ValueError as error:
            raise ConfigError(f"tp*pp*dp != world size: {error}; choose parallel.tp, parallel.pp and parallel.cp "
                              f"whose product divides {world_size}") from None
        try:
            return dataclasses.replace(layout, ep=self.ep)
        except ValueError as error:
            raise ConfigError(f"parallel.ep={self.ep}: {error}; choose an ep that divides dp * cp") from None

    def check_context_parallel(self, seq_length: int, eval_tasks: list) -> None:
        """cp > 1 cuts each row of seq_length tokens into 2 cp equal chunks (trainer/parallel/context.py), and
        trains on whole rows only: the in-loop harness evaluation runs the live model on rows of its own."""
        if self.cp == 1:
            return
        if seq_length % (2 * self.cp):
            raise ConfigError(f"data.seq_length={seq_length} is not a multiple of 2 * parallel.cp = {2 * self.cp}: "
                              f"context parallelism cuts each row into 2 cp equal chunks; choose a seq_length "
                              f"divisible by {2 * self.cp} or another parallel.cp")
        if eval_tasks:
            raise ConfigError(f"train.eval_tasks with parallel.cp={self.cp}: the in-loop harness evaluation runs the "
                              f"live model on whole rows; evaluate the checkpoints with glm-eval --harness instead")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio (GLM-130B: 1/10): the rate of the cosine's last step and after."""
    warmup_steps: int = 0
    """Linear warmup steps W: step s (0-based) of the first W trains at lr * (s + 1) / W, so step W - 1 is at
    the peak lr."""
    decay_steps: int = 0
    """Cosine steps D after warmup (0 = train.steps - warmup_steps): step W + k (k = 0..D-1) trains at
    lr * (m + (1 - m) * (1 + cos(pi * (k + 1) / D)) / 2), m = min_lr_ratio, so step W + D - 1 (with the default,
    the run's last step) is at lr * m. A resume with another train.steps re-plans this cosine (the run says so);
    set decay_steps to keep the old one."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3: 1 shards the optimizer states over the data-parallel ranks, 2 also the
    gradients, 3 also the weights. 2 and 3 need parallel.pp = 1 (DeepSpeed's own engine; its pipeline
    engine allows ZeRO-1 at most); 3 also parallel.tp = 1. An fp32 run with one data-parallel rank runs
    stage 0 for a requested 1: ZeRO-1 would have nothing to partition."""
    offload_optimizer: str = "none"
    """Keep the optimizer states (fp32 master weights, Adam moments) and run Adam on: none (the device),
    cpu (host memory; DeepSpeed's CPU Adam) or nvme (swap files under optim.nvme_path; DeepSpeed swaps only
    tensors of at least 1 MiB). cpu needs zero_stage >= 1, nvme zero_stage = 3 (DeepSpeed's ZeRO-1/2 keep
    offloaded states in host memory)."""
    offload_params: str = "none"
    """Keep the weights between uses on: none, cpu or nvme. Needs zero_stage = 3."""
    nvme_path: str = ""
    """Directory on a fast local disk for nvme offload (required when either offload is nvme)."""
    batch_size_warmup_steps: int = 0
    """Ramp the global batch from batch_size_warmup_start to parallel.global_batch_size over this many
    steps (0 = off; GLM-130B: 192 -> 4224 over 2.5% of the samples)."""
    batch_size_warmup_start: int = 0
    """First global batch of the batch-size warmup (a multiple of micro_batch_size * dp)."""
    batch_size_warmup_increment: int = 0
    """The ramp grows the global batch in steps of this many samples (0 = batch_size_warmup_start); a
    multiple of micro_batch_size * dp that divides global_batch_size - batch_size_warmup_start."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run (in total, counting those before a resume)."""
    seed: int = 1234
    """Seed of the weights, the data order and the blank-infilling randomness."""
    run_dir: str = "runs/glm"
    """Where metrics.jsonl, tb/ and checkpoints/ go."""
    resume: bool = False
    """Continue from the latest checkpoint in run_dir/checkpoints."""
    overwrite: bool = False
    """Start afresh in a run_dir that holds an earlier run: its metrics.jsonl, tb/ and checkpoints/ are deleted
    first. Without this (or resume), a run_dir holding an earlier run is refused."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (dynamic loss scaling)."""
    save_interval: int = 0
    """Save a checkpoint every this many steps (0 = only at the end)."""
    eval_interval: int = 0
    """Every this many steps, the validation loss and perplexity on data.valid_fraction of the sequences are
    logged with the training metrics (valid_loss, valid_ppl; 0 = only at the last step). Whenever there is a
    validation split they are logged at the last step too."""
    eval_batches: int = 2
    """Global batches of the validation split scored per evaluation (always the same ones)."""
    eval_tasks: list = field(default_factory=list)
    """lm-evaluation-harness tasks run on the model at every evaluation (train.eval_interval and the end): names
    of the shipped local tasks (glm_lastword, glm_cloze, glm_docs, glm_lastword_gen, the group glm_local), of tasks
    under train.eval_tasks_path or of lm-eval's own; their metrics are logged as `harness/TASK/METRIC`
    (docs/EVALUATION.md). Needs the eval extra, parallel.pp = 1 and optim.zero_stage <= 2."""
    eval_tasks_path: str = ""
    """A directory of your own lm-eval task YAMLs for train.eval_tasks (lm-eval's include_path)."""
    eval_tasks_limit: int = 0
    """Documents per task and evaluation of train.eval_tasks (0 = all)."""
    keep_checkpoints: int = 0
    """Keep only the newest this many checkpoints (0 = keep all)."""
    log_interval: int = 1
    """Print a log line every this many steps."""
    max_nonfinite_in_a_row: int = 5
    """Stop (with a checkpoint of the last good state) after more than this many consecutive steps with a
    non-finite loss or gradient norm; such steps are skipped and counted (0 = never stop)."""
    collective_timeout_minutes: float = 30.0
    """A collective that waits longer than this fails with an error naming the rank, instead of hanging."""
    deepspeed_config: str = ""
    """Path of a DeepSpeed JSON merged over the generated one (its keys win)."""


@dataclass
class FinetuneConfig:
    init_from: str = ""
    """Start from these weights with a fresh optimizer, LR schedule and step 0: an export (glm-ckpt export), a
    run's checkpoints/ or global_stepN directory (model shape from this config), or a THUDM/GLM release.
    Empty: random init. Ignored on train.resume (the run's own checkpoint wins)."""
    freeze_embeddings: bool = False
    """Keep the word, position and block-position embeddings fixed (the tied output layer with them)."""
    freeze_blocks: int = 0
    """Keep the first this many transformer blocks fixed."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: Optional[int] = None) -> None:
        """Check every section and the layout; world_size None skips the arithmetic that needs it."""
        self.model.validate(self.parallel.tp)
        self.data.validate()
        p, t = self.parallel, self.train
        for name in ("tp", "pp", "cp", "ep", "micro_batch_size", "global_batch_size"):
            if getattr(p, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
        if p.recompute_interval < 0:
            raise ConfigError(f"parallel.recompute_interval must be >= 0 (0 = off), got {p.recompute_interval}")
        if p.pp > self.model.num_layers:
            raise ConfigError(f"parallel.pp={p.pp} is greater than model.num_layers={self.model.num_layers}: "
                              f"every pipeline stage needs at least one block; lower pp")
        if self.data.seq_length > self.model.max_sequence_length:
            raise ConfigError(f"data.seq_length={self.data.seq_length} exceeds model.max_sequence_length="
                              f"{self.model.max_sequence_length}: raise the latter or shorten the former")
        if t.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={t.precision!r} is not one of {', '.join(PRECISIONS)}")
        if t.resume and t.overwrite:
            raise ConfigError("train.resume and train.overwrite are both true: continue the run (resume) or delete "
                              "it and start afresh (overwrite), not both")
        if t.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
        if not 0 <= t.seed < MAX_SEED:
            raise ConfigError(f"train.seed must be in [0, 2**63), got {t.seed}: seeds feed torch and numpy generators "
                              f"that take 64-bit values; pick a smaller seed")
        if not t.run_dir.strip():
            raise ConfigError("train.run_dir is empty: name a directory for metrics.jsonl, tb/ and checkpoints/ "
                              "(such as runs/glm)")
        for name, least in (("save_interval", 0), ("keep_checkpoints", 0), ("max_nonfinite_in_a_row", 0),
                            ("log_interval", 1)):
            if getattr(t, name) < least:
                raise ConfigError(f"train.{name} must be >= {least}, got {getattr(t, name)}")
        if t.eval_interval < 0 or t.eval_batches < 1:
            raise ConfigError("train.eval_interval must be >= 0 and train.eval_batches >= 1")
        if t.eval_interval and self.data.valid_fraction <= 0:
            raise ConfigError(f"train.eval_interval={t.eval_interval} needs a validation split: set "
                              f"data.valid_fraction (e.g. 0.05)")
        if t.eval_tasks and not (t.eval_interval and p.pp == 1 and self.optim.zero_stage <= 2):
            raise ConfigError(f"train.eval_tasks runs on the live model at each evaluation, at parallel.pp = 1 and "
                              f"optim.zero_stage <= 2 (here train.eval_interval={t.eval_interval}, pp={p.pp}, zero_stage="
                              f"{self.optim.zero_stage}): set train.eval_interval, or evaluate the checkpoints with "
                              f"glm-eval --harness")
        if not all(isinstance(name, str) and name for name in t.eval_tasks) or t.eval_tasks_limit < 0:
            raise ConfigError(f"train.eval_tasks must list task names and train.eval_tasks_limit be >= 0, got "
                              f"{t.eval_tasks!r} and {t.eval_tasks_limit}")
        if not (math.isfinite(t.collective_timeout_minutes) and 0 < t.collective_timeout_minutes <= MAX_TIMEOUT_MINUTES):
            raise ConfigError(f"train.collective_timeout_minutes must be a finite number in (0, {MAX_TIMEOUT_MINUTES}] "
                              f"(a year), got {t.collective_timeout_minutes}")
        self._validate_sequence_parallel()
        self._validate_zero()
        self._validate_expert_parallel()
        self._validate_optim()
        self._validate_finetune()
        if world_size is not None:
            self.data_parallel_size(world_size)
            self.grad_accum_steps(world_size)
            self.check_batch_size_warmup(world_size)
        p.check_context_parallel(self.data.seq_length, t.eval_tasks)
        if p.cp > 1 and self.model.moe_aux_loss_coeff:
            raise ConfigError(f"model.moe_aux_loss_coeff with parallel.cp={p.cp}: the balance loss would be computed "
                              f"on each rank's chunks, not the whole row; set model.moe_aux_loss_coeff=0 or parallel.cp=1")

    def _validate_sequence_parallel(self) -> None:
        """parallel.sequence_parallel splits each row's tokens over the tensor-parallel ranks."""
        p = self.parallel
        if not p.sequence_parallel:
            return
        if p.tp < 2:
            raise ConfigError(f"parallel.sequence_parallel=true needs tensor parallelism (it splits the sequence over "
                              f"the tensor-parallel ranks), got parallel.tp={p.tp}: set parallel.tp > 1 or "
                              f"parallel.sequence_parallel=false")
        if self.data.seq_length % (p.tp * p.cp):
            raise ConfigError(f"parallel.sequence_parallel=true splits each row over the tensor-parallel ranks: "
                              f"data.seq_length={self.data.seq_length} is not divisible by parallel.tp={p.tp}"
                              f"{f' x parallel.cp={p.cp}' if p.cp > 1 else ''}; choose a data.seq_length that is a "
                              f"multiple of {p.tp * p.cp}")
        if self.train.eval_tasks:
            raise ConfigError("train.eval_tasks scores requests of any length on the live model, which "
                              "parallel.sequence_parallel=true splits over the tensor ranks: evaluate the checkpoints "
                              "with glm-eval --harness, or set parallel.sequence_parallel=false")

    def _validate_zero(self) -> None:
        """ZeRO stage and offload against the layout (pipeline engine: ZeRO <= 1)."""
        o, p = self.optim, self.parallel
        if o.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"optim.zero_stage={o.zero_stage} is not a ZeRO stage: use 0, 1, 2 or 3")
        if o.zero_stage >= 2 and p.pp > 1:
            raise ConfigError(f"optim.zero_stage={o.zero_stage} with parallel.pp={p.pp}: DeepSpeed's pipeline engine "
                              f"allows ZeRO-1 at most; set optim.zero_stage to 0 or 1, or parallel.pp to 1")
        for key in ("offload_optimizer", "offload_params"):
            if getattr(o, key) not in OFFLOAD_DEVICES:
                raise ConfigError(f"optim.{key}={getattr(o, key)!r} is not one of {', '.join(OFFLOAD_DEVICES)}")
        if o.offload_optimizer != "none" and o.zero_stage == 0:
            raise ConfigError(f"optim.offload_optimizer={o.offload_optimizer} needs ZeRO: set optim.zero_stage to 1, 2 "
                              f"or 3")
        if o.offload_optimizer == "nvme" and o.zero_stage != 3:
            raise ConfigError(f"optim.offload_optimizer=nvme with optim.zero_stage={o.zero_stage}: DeepSpeed swaps optimizer "
                              f"states to NVMe under ZeRO-3 only (ZeRO-1/2 keep offloaded states in host memory); set "
                              f"optim.zero_stage=3, or optim.offload_optimizer=cpu")
        if o.offload_params != "none" and o.zero_stage != 3:
            raise ConfigError(f"optim.offload_params={o.offload_params} needs sharded weights: set optim.zero_stage=3")
        if "nvme" in (o.offload_optimizer, o.offload_params) and not o.nvme_path:
            raise ConfigError("nvme offload needs a directory: set optim.nvme_path to a local NVMe mount")

    def _validate_expert_parallel(self) -> None:
        """parallel.ep > 1: an MoE model whose experts split evenly; fp32 without ZeRO, where the trainer reduces
        the expert gradients over their expert-data group and counts each expert once in the norm itself
        (engine/grad_reduce.py, engine/grad_norm.py), or ZeRO-1/2 in any precision, whose optimizer partitions
        and reduces the experts over their expert-data group (engine/deepspeed_compat.py: zero_partitions_experts).
        Not ZeRO-3 (it would partition each expert over ranks holding different experts), nor, for now, ZeRO with
        optimizer offload or the pipeline engine."""
        ep, experts = self.parallel.ep, self.model.moe_num_experts
        if ep == 1:
            return
        if not experts:
            raise ConfigError(f"parallel.ep={ep} on a dense model: expert parallelism splits the routed experts of "
                              f"MoE layers; set model.moe_num_experts, or parallel.ep=1")
        if experts % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide model.moe_num_experts={experts}: every expert-"
                              f"parallel rank holds the same number of experts; choose an ep that divides {experts}")
        refusal = expert_parallel_refusal(ep, self.optim.zero_stage, self.train.precision,
                                          self.optim.offload_optimizer, self.parallel.pp)
        if refusal is not None:
            raise ConfigError(refusal)

    def _validate_optim(self) -> None:
        """Ranges of the optimizer and schedule keys (a NaN or an infinity is refused, not trained on)."""
        ranges = {"lr": ("> 0", lambda v: v > 0), "eps": ("> 0", lambda v: v > 0),
                  "beta1": ("in [0, 1)", lambda v: 0 <= v < 1), "beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
                  "min_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1), "weight_decay": (">= 0", lambda v: v >= 0),
                  "grad_clip": (">= 0 (0 = off)", lambda v: v >= 0)}
        for name, (wanted, holds) in ranges.items():
            value = getattr(self.optim, name)
            if not (math.isfinite(value) and holds(value)):
                raise ConfigError(f"optim.{name} must be a finite number {wanted}, got {value}")
        for name in ("warmup_steps", "decay_steps", "batch_size_warmup_steps", "batch_size_warmup_start",
                     "batch_size_warmup_increment"):
            if getattr(self.optim, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0 (a count of steps or samples), got "
                                  f"{getattr(self.optim, name)}")

    def _validate_finetune(self) -> None:
        f = self.finetune
        if not 0 <= f.freeze_blocks <= self.model.num_layers:
            raise ConfigError(f"finetune.freeze_blocks={f.freeze_blocks} must be in [0, model.num_layers="
                              f"{self.model.num_layers}]")
        if (f.freeze_blocks or f.freeze_embeddings) and not f.init_from:
            raise ConfigError("finetune.freeze_embeddings / freeze_blocks keep weights fixed, which only makes sense "
                              "for trained ones: set finetune.init_from to a checkpoint, export or release")
        if f.init_from and not Path(f.init_from).exists():
            raise ConfigError(f"finetune.init_from={f.init_from} does not exist: point it at an export, a run's "
                              f"checkpoints/ directory or a THUDM/GLM release")

    def data_parallel_size(self, world_size: int) -> int:
        return self.parallel.layout(world_size).dp

    def check_batch_size_warmup(self, world_size: int) -> None:
        o, p = self.optim, self.parallel
        if o.batch_size_warmup_steps <= 0:
            return
        unit = p.micro_batch_size * self.data_parallel_size(world_size)
        start, increment = o.batch_size_warmup_start, o.batch_size_warmup_increment or o.batch_size_warmup_start
        if not 0 < start < p.global_batch_size or start % unit or increment % unit \
                or (p.global_batch_size - start) % increment:
            raise ConfigError(f"batch-size warmup: optim.batch_size_warmup_start={start} and _increment={increment} "
                              f"must be multiples of micro_batch_size * dp = {unit}, start below "
                              f"parallel.global_batch_size={p.global_batch_size}, and the increment must divide "
                              f"the difference")

    def grad_accum_steps(self, world_size: int, global_batch: Optional[int] = None) -> int:
        dp = self.data_parallel_size(world_size)
        global_batch = global_batch or self.parallel.global_batch_size
        per_step = self.parallel.micro_batch_size * dp
        if global_batch % per_step:
            raise ConfigError(f"global batch {global_batch} is not divisible by micro_batch_size * dp = "
                              f"{self.parallel.micro_batch_size}*{dp}: micro-batch * grad-accumulation * dp "
                              f"must equal the global batch")
        return global_batch // per_step


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check a YAML value against a dataclass field's annotation (ints are accepted for floats)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-3 (no dot) as a string; the user meant the number
            value = float(value)
        except ValueError:
            pass
    expected = {int: int, float: (int, float), bool: bool, str: str, dict: dict, list: list}.get(annotation, object)
    if isinstance(value, bool) and annotation is not bool:
        raise ConfigError(f"{key} expects {annotation.__name__}, got the boolean {value}")
    if not isinstance(value, expected):
        name = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"{key} expects {name}, got {shown(value)} ({type(value).__name__})")
    return float(value) if annotation is float else value


RENAMED = {"parallel.activation_checkpoint_interval": "parallel.recompute_interval"}
"""Keys of earlier versions: a config that still uses one is told the new name."""


def _apply(obj: Any, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if full in RENAMED:
            raise ConfigError(f"{full} is now called {RENAMED[full]}: rename it in the config or --set")
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} is a section: give it a mapping of keys, got {shown(value)}")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def yaml_error_line(error: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: the problem and where (line and column, 1-based)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently). Keys
    brought in by a merge (`<<: *defaults`) may be overridden by the mapping's own keys, as YAML says."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (line "
                                                        f"{key_node.start_mark.line + 1}): keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


MAX_YAML_NODES = 100_000
"""A config document may hold at most this many values once its aliases are expanded: configs hold a few
hundred, and a document whose aliases multiply (an "alias bomb") is refused before it is built."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes `node` stands for with every alias expanded (memoised by node identity)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise ConfigError("refers to itself through an alias (a recursive anchor): write the values out")
    open_nodes.add(id(node))
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
        node.value if isinstance(node, yaml.SequenceNode) else [])
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_nodes)
        if size > MAX_YAML_NODES:
            break
    open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size


def load_yaml(text: str, what: str) -> Any:
    """One YAML document read with UniqueKeyLoader, refused (ConfigError naming `what`) when its aliases expand
    to more than MAX_YAML_NODES values; yaml.YAMLError for text that is not YAML."""
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {}, set())
        except ConfigError as error:
            raise ConfigError(f"{what} {error}") from None
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{what} expands to more than {MAX_YAML_NODES} values through its aliases (&anchor / "
                              f"*alias): a config is a few hundred; write it without the repeated aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def shown(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for quoting user values in one-line errors."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_override(text: str) -> dict:
    """`section.key=value` -> {"section": {"key": value}}, the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {shown(text)} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = load_yaml(raw, f"--set {dotted}") if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {shown(text)}: the value is not valid YAML ({yaml_error_line(error)})") from None
    nested: dict = value
    for part in reversed(dotted.strip().split(".")):
        nested = {part: nested}
    return nested


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True,
                         config_help: str = "YAML run configuration (configs/*.yaml)") -> None:
    """`--config FILE` and repeatable `--set section.key=value`, as every glm-* command takes them
    (read back with load_config(args.config, args.overrides))."""
    parser.add_argument("--config", required=required, help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (YAML value); repeatable; wins over the file")


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Build a Config from defaults, a YAML file and `--set` overrides; structure and types checked."""
    config = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory: pass a YAML file such as configs/glm-debug.yaml")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass a YAML file such as configs/glm-debug.yaml")
        try:
            values = load_yaml(read_user_text(path, "config file"), f"config file {path}")
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_error_line(error)}") from None
        if values is None:
            raise ConfigError(f"config file {path} is empty: give at least one section, as configs/glm-debug.yaml does")
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
        _apply(config, values, "")
    return with_overrides(config, overrides)


def with_overrides(config: Config, overrides: tuple[str, ...] | list[str]) -> Config:
    """A copy of `config` with `--set` overrides applied in order (structure and types checked as load_config
    checks them): how glm-launch adds its plan to the config it planned from, without reading the YAML again."""
    config = copy.deepcopy(config)
    for text in overrides:
        _apply(config, parse_override(text), "")
    return config


def config_yaml(config: Config) -> str:
    """The config as YAML that load_config reads back to an equal Config."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def expert_parallel_refusal(ep: int, zero: int, precision: str, offload_optimizer: str, pp: int) -> Optional[str]:
    """Why expert parallelism at `ep` > 1 cannot run with this ZeRO stage, precision, optimizer offload and
    pipeline depth (the message names the fix), or None where it can. The one statement of the rule: the config
    check raises it, and glm-launch's planner skips the layouts it refuses (launch/planner.py)."""
    if ep == 1:
        return None
    if zero == 3:
        return (f"parallel.ep={ep} with optim.zero_stage=3: ZeRO-3 would partition each expert weight over all "
                f"dp x cp ranks, but the ranks of an expert-parallel group hold different experts; set "
                f"optim.zero_stage=1 or 2 (expert states partitioned over the ranks that hold the same experts), "
                f"or parallel.ep=1")
    if zero == 0 and precision != "fp32":
        return (f"parallel.ep={ep} with train.precision={precision} needs ZeRO (its fp32 master weights and skipped "
                f"non-finite steps): set optim.zero_stage=1 or 2, or train.precision=fp32")
    if zero > 0 and offload_optimizer != "none":
        return (f"parallel.ep={ep} with optim.offload_optimizer={offload_optimizer}: expert parallelism with "
                f"optimizer offload is not supported yet; set optim.offload_optimizer=none, or parallel.ep=1")
    if zero > 0 and pp > 1:
        return (f"parallel.ep={ep} with parallel.pp={pp} and optim.zero_stage={zero}: expert parallelism in the "
                f"pipeline engine runs without ZeRO for now; set optim.zero_stage=0 (and train.precision=fp32), or "
                f"parallel.pp=1")
    return None
