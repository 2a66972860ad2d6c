"""Every use of a DeepSpeed name that is not public API, in one place, each with why it is needed.

Public API here means what DeepSpeed documents: deepspeed.initialize / init_distributed / zero.Init, the
engine's forward, backward, step, train_batch, eval_batch, save_checkpoint, load_checkpoint, counters and
getters, deepspeed.pipe's PipelineModule / LayerSpec / TiedLayerSpec and their documented arguments,
deepspeed.runtime.pipe.topology, deepspeed.utils' safe_get_* / safe_set_* tensor accessors, the config
JSON, and DeepSpeedCPUAdam. Everything else the trainer needs of DeepSpeed's live objects (engine, optimizers,
pipeline module) is below; what its checkpoint files hold is the other half of the adapter,
trainer/checkpoint/ds_format.py, which sits below both checkpoint and engine. tests/test_deepspeed_compat.py
checks that the installed DeepSpeed still has each of these names and fails naming the one that moved,
and that no other file of the trainer reaches into DeepSpeed's internals.

Written against DeepSpeed 0.19.x (setup.cfg).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.engine import DeepSpeedEngine

from trainer.parallel.comm import group_rank, group_size

# ---- The engine ------------------------------------------------------------------------------------------

@contextmanager
def expert_blocks_kept(params: list[torch.Tensor]) -> Iterator[None]:
    """Around deepspeed.initialize: each rank's routed-expert blocks (`params`, expert parallelism) are what they
    were before the engine started. Why: the engine's constructor broadcasts every parameter from data-parallel
    rank 0 (its private `_broadcast_model`) except those it takes for its own MoE experts, marked by DeepSpeed's
    MoE groups registry; the ranks of an ep group hold different experts, so the broadcast would give every rank
    rank 0's block."""
    kept = _host_copies(params)
    yield
    _copy_back(params, kept)


def _host_copies(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [param.detach().to("cpu", copy=True) for param in params]  # on the host: no device memory


def _copy_back(params: list[torch.Tensor], kept: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, kept):
            param.copy_(value)


def expert_group_name(ep: int) -> str:
    """The name DeepSpeed gives the groups of an expert-parallel size (deepspeed.utils.groups: "ep_size_{ep}"); the
    trainer has one such size, and marks its experts and their optimizer groups with it."""
    return f"ep_size_{ep}"


def expert_param_group(group: dict, ep: int) -> dict:
    """`group` (an optimizer parameter group holding routed-expert weights only) marked as DeepSpeed's ZeRO-1/2
    recognises an expert group. Why: the keys `moe` and `name` are the convention of DeepSpeed's MoE
    (deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer); ZeRO-1/2 partitions such a group's
    states over the expert-data group named `name` instead of the whole data-parallel group. torch's AdamW keeps
    the extra keys and ignores them."""
    return {**group, "moe": True, "name": expert_group_name(ep)}


@contextmanager
def zero_partitions_experts(experts: list[torch.Tensor], ep: int, ep_group, edp_group) -> Iterator[None]:
    """Around deepspeed.initialize under ZeRO-1/2 at parallel.ep > 1: the ZeRO optimizer partitions the optimizer
    groups of `experts` (marked by expert_param_group) over `edp_group`, the ranks holding the same experts, and
    reduces their gradients there (summed, divided by the whole data-parallel size like every gradient); the rest
    over dp x cp as always (both groups real process groups, size 1 included: DeepSpeed reads None as the whole
    world). Its gradient norm then counts each expert once: it sums every rank's squares over the
    whole data-parallel group, in which each expert's partitions are disjoint.

    Why: ZeRO-1/2 does this for parameters marked as DeepSpeed's MoE marks its experts (`allreduce = False` and
    `group_name`: deepspeed.moe.utils.is_moe_param) in groups marked `moe`, with the engine's dictionaries
    `expert_parallel_group` / `expert_data_parallel_group` {name: group}, but the engine hands them to the optimizer
    only when its constructor found one of DeepSpeed's own MoE modules (`has_moe_layers`, an isinstance check),
    and that flag also switches its checkpoints to DeepSpeed's MoE files, which know only its own layer. So the
    flag is raised, with the trainer's own ep and edp groups (its rank rule, trainer/parallel/mesh.py, not
    DeepSpeed's registry), only while the engine builds its ZeRO optimizer (its private `_configure_zero_optimizer`);
    the experts' checkpoint files are the trainer's (trainer/checkpoint/expert_files.py). Each rank's expert
    blocks are put back (as by expert_blocks_kept) before ZeRO takes its master copy of them."""
    name = expert_group_name(ep)
    original = DeepSpeedEngine._configure_zero_optimizer
    kept = _host_copies(experts)
    built = []

    def configure_zero_optimizer(engine, *args, **kwargs):
        built.append(True)
        # Each rank's own expert blocks, which the engine's start-time broadcast overwrote (expert_blocks_kept),
        # back before ZeRO copies the weights into its fp32 master partitions.
        _copy_back(experts, kept)
        for param in experts:
            param.allreduce, param.group_name = False, name
        saved = engine.has_moe_layers, engine.expert_parallel_group, engine.expert_data_parallel_group
        engine.has_moe_layers = True
        engine.expert_parallel_group, engine.expert_data_parallel_group = {name: ep_group}, {name: edp_group}
        try:
            return original(engine, *args, **kwargs)
        finally:
            engine.has_moe_layers, engine.expert_parallel_group, engine.expert_data_parallel_group = saved

    DeepSpeedEngine._configure_zero_optimizer = configure_zero_optimizer
    try:
        yield
    finally:
        DeepSpeedEngine._configure_zero_optimizer = original
    if not built:  # another optimizer wrapper (a user JSON's data_types, say) would treat the experts as dense
        raise RuntimeError("DeepSpeed built no ZeRO-1/2 optimizer for a run with parallel.ep > 1: its experts would "
                           "be reduced and partitioned like dense weights")


def wrap_model_step(engine, before: Optional[Callable[[], None]] = None,
                    after: Optional[Callable[[], None]] = None) -> None:
    """Run `before` / `after` around every optimizer step of the engine.

    Why: the pipeline engine's train_batch runs forward, backward, the gradient all-reduce and the optimizer
    step in one call, so the trainer's own gradient clipping (trainer/engine/loop.py) can only run between
    the reduced gradients and the step from inside the engine's `_take_model_step`. The plain engine needs
    none of this: the trainer calls its public backward and step itself (trainer/engine/plain.py)."""
    original = engine._take_model_step

    def take_model_step(*args, **kwargs):
        if before is not None:
            before()
        result = original(*args, **kwargs)
        if after is not None:
            after()
        return result

    engine._take_model_step = take_model_step


def mark_step_skipped(optimizer, skipped: bool) -> None:
    """Tell the engine whether the coming optimizer step is skipped (a non-finite gradient norm).

    Why: DeepSpeed's engine reads `optimizer.overflow` after the step to count a skipped step
    (engine.skipped_steps) and to hold the LR schedule, as its fp16 and ZeRO optimizers set it; a plain
    torch optimizer has no such flag, so the trainer's own clipping sets it."""
    optimizer.overflow = skipped


def loss_scale(optimizer) -> float:
    """The current dynamic loss scale of an fp16 run.

    Why: the engine has no public getter for it. Every fp16-capable optimizer of DeepSpeed 0.19 (FP16_Optimizer,
    FP16_UnfusedOptimizer, ZeRO-1/2/3) exposes it as the `loss_scale` property; where it lives behind that
    differs (`loss_scale_config.cur_scale`, `loss_scaler.cur_scale`), and FP16_Optimizer has no `cur_scale`."""
    return float(optimizer.loss_scale)


def refresh_master_weights(optimizer) -> None:
    """Copy the (just loaded) weights into the fp32 master copy of DeepSpeed's bf16/fp16 optimizers without ZeRO;
    nothing for other optimizers (torch's AdamW steps the weights themselves; ZeRO's are set through
    safe_set_full_fp32_param).

    Why: `refresh_fp32_params` is how those optimizers take weights written into the module from outside
    DeepSpeed's own load_checkpoint (a resume from another layout, trainer/engine/resume.py); it is not among
    the documented engine methods."""
    if hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()


# ---- The pipeline module ---------------------------------------------------------------------------------


class BoundedPipelineModule(PipelineModule):
    """A PipelineModule whose stage bounds come from `stage_bounds(num_stages)`.

    Why: none of PipelineModule's partition_method values ("uniform", "parameters", "type:...") can give
    GLM's split (trainer/engine/partition.py): "type:" with the embedding and the output head weighted as one
    block each can leave a stage without a transformer block (3 blocks on 3 stages: 1, 2, 0), and it breaks
    ties towards other stages than the middle ones. DeepSpeed calls `_partition_layers` from its __init__ and
    reads the bounds through `_set_bounds`."""

    def stage_bounds(self, num_stages: int) -> list[int]:
        raise NotImplementedError

    def _partition_layers(self, method: str = "uniform") -> None:
        self.parts = self.stage_bounds(self.num_stages)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def is_pipeline_replica(param: torch.Tensor) -> bool:
    """Whether `param` is the pipeline's second copy of a tied weight (the output head's word embedding on
    the last stage). Why: DeepSpeed marks it only with the attribute `ds_pipe_replicated`; the gradient norm
    must count the tied weight once."""
    return bool(getattr(param, "ds_pipe_replicated", False))


def skip_backward_allreduce(engine) -> None:
    """Turn off the pipeline engine's flat-buffer gradient all-reduce over its data-parallel group: with one
    data-parallel rank it is a copy onto itself, and at parallel.ep > 1 the trainer reduces itself, the experts
    over their expert-data group (engine/grad_reduce.py). Why: `pipeline_enable_backward_allreduce` is the engine
    attribute that turns it off (the tied embedding's all-reduce between stages is a separate instruction and
    stays)."""
    engine.pipeline_enable_backward_allreduce = False


# ---- ZeRO optimizers -------------------------------------------------------------------------------------


def zero_fp32_partitions(optimizer) -> Optional[list[torch.Tensor]]:
    """The flat fp32 master partitions a ZeRO optimizer hands its base optimizer (one per group: ZeRO-1/2;
    one per sub-group: ZeRO-3), or None for any other optimizer.

    Why: an optimizer that has never stepped has no Adam state, and safe_set_full_optimizer_state needs one to
    write into (a resume from another layout, trainer/engine/resume.py); the state lives on these
    tensors. ZeRO-1/2 name them `single_partition_of_fp32_groups`, ZeRO-3 `fp32_partitioned_groups_flat`."""
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(optimizer, name):
            return list(getattr(optimizer, name))
    return None


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also under ZeRO-3. Why: zero.Init replaces each weight's data by an empty
    placeholder (its partition lives elsewhere) and keeps the real shape only in `ds_shape`."""
    return getattr(param, "ds_shape", param.shape)


def is_zero_optimizer(optimizer) -> bool:
    return zero_fp32_partitions(optimizer) is not None


def zero_adam_step(optimizer) -> Optional[int]:
    """Adam's step count of a ZeRO optimizer (every group steps together), None before its first step.

    Why: the base optimizer's state, keyed by the flat fp32 partitions (zero_fp32_partitions), is where it lives;
    DeepSpeed's safe_get_full_optimizer_state gathers tensors of a parameter's shape, not this count."""
    state = optimizer.optimizer.state.get(zero_fp32_partitions(optimizer)[0], {})
    return int(state["step"]) if "step" in state else None


def link_zero_moments(optimizer) -> None:
    """Give every parameter of a ZeRO-1/2 optimizer that has stepped its view of the Adam moments, which
    safe_get_full_optimizer_state reads.

    Why: DeepSpeed 0.19.8 steps the base optimizer one parameter group at a time and links the parameters' views
    (`_lazy_init_hp_params_optimizer_state`) after the first group's first step, marking them all linked
    (`_hp_optimizer_states_linked`): the groups stepped after it (at ep > 1 the experts' groups) get empty views.
    Linking again once every group has its state gives each parameter its moments."""
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def initialise_zero_moments(optimizer, step: int, moment_keys: tuple[str, ...]) -> None:
    """Create a zero Adam state at Adam step `step` on every fp32 partition of a ZeRO optimizer, and link it to
    the parameters (ZeRO-1/2), so safe_set_full_optimizer_state has somewhere to write.

    Why: torch's AdamW and DeepSpeedCPUAdam create their state lazily at the first step; ZeRO-1/2 link the
    per-parameter views of it (`_lazy_init_hp_params_optimizer_state`) only then. The step is a tensor for
    torch's optimizers and an int for DeepSpeedCPUAdam (its C++ kernel takes it so)."""
    base = optimizer.optimizer
    cpu_adam = type(base).__name__ == "DeepSpeedCPUAdam"
    for index, flat in enumerate(zero_fp32_partitions(optimizer)):
        swapped = _is_swapped_to_nvme(optimizer, index)
        if swapped:
            optimizer._optimizer_states_and_gradient_swap_in(index)  # `flat` holds its elements only while in
        # A tensor of its own per partition: torch's AdamW increments the step in place.
        base.state[flat] = {"step": step if cpu_adam else torch.tensor(float(step)),
                            **{key: torch.zeros_like(flat) for key in moment_keys}}
        if swapped:
            optimizer._optimizer_states_and_gradient_swap_out(index)  # the new moments get swap files of their own
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._lazy_init_hp_params_optimizer_state()


def _is_swapped_to_nvme(optimizer, sub_group: int) -> bool:
    """Whether a ZeRO-3 sub-group's fp32 partition and Adam state live in NVMe swap files (optimizer offload
    nvme; sub-groups under 1 MiB stay in host memory).

    Why: between steps such a partition is an empty tensor and its state is read in and written back around
    each use by `_optimizer_states_and_gradient_swap_in` / `_swap_out`; `_swappable_optimizer_subgroup` is
    ZeRO-3's own test. A zero Adam state made for a resume must be made while the partition is in, and be
    written out, so that swap files exist for the moments safe_set_full_optimizer_state then fills."""
    return bool(getattr(optimizer, "swap_optimizer", False)) and optimizer._swappable_optimizer_subgroup(sub_group)


def set_zero3_weight(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write this rank's partition of a ZeRO-3 weight from its whole (tensor-rank-local) value.

    Why: under ZeRO-3 a parameter's data is an empty placeholder and its partition is `ds_tensor`: ceil(n / dp)
    elements of the flattened weight, the last rank's zero padded. safe_set_full_fp32_param sets only the fp32
    master copy, so a weight loaded from another layout would be replaced by the master copy only at the next
    step, after a forward with the old one."""
    group = param.ds_process_group
    rank, size = group_rank(group), group_size(group)
    piece = param.ds_tensor.numel()
    flat = torch.zeros(piece * size, dtype=param.ds_tensor.dtype)
    flat[:value.numel()] = value.reshape(-1)
    with torch.no_grad():
        param.ds_tensor.copy_(flat.narrow(0, rank * piece, piece))
