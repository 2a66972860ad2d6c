"""The DeepSpeed contract: what the adapter uses still exists in the installed DeepSpeed, and no other file of the
trainer reaches into DeepSpeed's internals. The adapter has two halves: trainer/engine/deepspeed_compat.py (live
engine and optimizer objects) and trainer/checkpoint/ds_format.py (what DeepSpeed's checkpoint files hold, below
both checkpoint and engine)."""
import ast
import inspect
import re
from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = ("trainer/engine/deepspeed_compat.py", "trainer/checkpoint/ds_format.py")
ADAPTER = " or ".join(ADAPTERS)

METHODS = [
    (DeepSpeedEngine, "_take_model_step", "wrap_model_step: the trainer's clipping inside the pipeline's train_batch"),
    (PipelineModule, "_partition_layers", "BoundedPipelineModule: GLM's stage split"),
    (PipelineModule, "_set_bounds", "BoundedPipelineModule: GLM's stage split"),
    (DeepSpeedZeroOptimizer, "_lazy_init_hp_params_optimizer_state", "initialise_zero_moments, link_zero_moments"),
    (DeepSpeedEngine, "_configure_zero_optimizer", "zero_partitions_experts: ZeRO-1/2 at parallel.ep > 1"),
    (DeepSpeedZeroOptimizer_Stage3, "_swappable_optimizer_subgroup", "_is_swapped_to_nvme (optimizer offload nvme)"),
    (DeepSpeedZeroOptimizer_Stage3, "_optimizer_states_and_gradient_swap_in", "initialise_zero_moments (nvme)"),
    (DeepSpeedZeroOptimizer_Stage3, "_optimizer_states_and_gradient_swap_out", "initialise_zero_moments (nvme)"),
    (FP16_Optimizer, "refresh_fp32_params", "refresh_master_weights: a resume from another layout (fp16)"),
    (BF16_Optimizer, "refresh_fp32_params", "refresh_master_weights: a resume from another layout (bf16)"),
]
SOURCE_NAMES = [
    # (class, attribute name its source must mention, what needs it)
    (DeepSpeedEngine, "self.optimizer.overflow", "mark_step_skipped: a skipped step counted, the LR held"),
    (DeepSpeedEngine, "expert_parallel_group=self.expert_parallel_group if self.has_moe_layers",
     "zero_partitions_experts: the expert groups handed to ZeRO-1/2"),
    (DeepSpeedEngine, "expert_data_parallel_group=self.expert_data_parallel_group if self.has_moe_layers",
     "zero_partitions_experts: the expert groups handed to ZeRO-1/2"),
    (DeepSpeedZeroOptimizer, "self.expert_dp_process_group[group['name']]", "expert_param_group: the `name` key"),
    (DeepSpeedZeroOptimizer, "'moe' in group and group['moe']", "expert_param_group: the `moe` key"),
    (DeepSpeedZeroOptimizer, "self.expert_dp_process_group[param.group_name] if is_moe_param(",
     "zero_partitions_experts: `allreduce`/`group_name` route an expert's gradient"),
    (DeepSpeedZeroOptimizer, "_hp_optimizer_states_linked", "link_zero_moments"),
    (PipelineEngine, "pipeline_enable_backward_allreduce", "skip_backward_allreduce"),
    (DeepSpeedZeroOptimizer, "single_partition_of_fp32_groups", "zero_fp32_partitions, checkpoint reading (ZeRO-1/2)"),
    (DeepSpeedZeroOptimizer, "param_slice_mappings", "zero12_fragments: ZeRO-1/2 checkpoint files"),
    (DeepSpeedZeroOptimizer, "base_optimizer_state", "zero12_fragments: ZeRO-1/2 checkpoint files"),
    (DeepSpeedZeroOptimizer_Stage3, "fp32_partitioned_groups_flat", "zero_fp32_partitions (ZeRO-3)"),
    (DeepSpeedZeroOptimizer_Stage3, "FP32_FLAT_GROUPS", "zero3_partitions: ZeRO-3 checkpoint files"),
    (DeepSpeedZeroOptimizer_Stage3, "OPTIMIZER_STATE_DICT", "zero3_partitions: ZeRO-3 checkpoint files"),
    (DeepSpeedZeroOptimizer_Stage3, "self.swap_optimizer", "_is_swapped_to_nvme (optimizer offload nvme)"),
    (DeepSpeedEngine, "offloaded_tensors", "offloaded_tensors_dir: the NVMe swap files a checkpoint copies"),
    (DeepSpeedEngine, "checkpoint_parallel_dimensions", "checkpoint_layout"),
    (DeepSpeedEngine, "param_shapes", "param_shapes: the flattening order of the partitions"),
    (DeepSpeedEngine, "ds_config=self.config", "offloads_optimizer: the run's DeepSpeed config in its checkpoint"),
    (DeepSpeedEngine, "zero_pp_rank_", "zero_file / zero3_model_states_file names"),
]
PROPERTIES = [
    # (class, property the adapter reads, what needs it)
    (FP16_Optimizer, "loss_scale", "loss_scale: metrics.jsonl's loss_scale under fp16"),
    (DeepSpeedZeroOptimizer, "loss_scale", "loss_scale: metrics.jsonl's loss_scale under fp16 and ZeRO-1/2"),
    (DeepSpeedZeroOptimizer_Stage3, "loss_scale", "loss_scale: metrics.jsonl's loss_scale under fp16 and ZeRO-3"),
]


@pytest.mark.parametrize("cls, name, why", METHODS, ids=[f"{c.__name__}.{n}" for c, n, _ in METHODS])
def test_the_adapter_s_methods_exist(cls, name, why):
    assert callable(getattr(cls, name, None)), (
        f"DeepSpeed {deepspeed.__version__} has no {cls.__name__}.{name}, which {ADAPTER} uses for {why}: "
        f"adapt that function to the new DeepSpeed, or pin deepspeed to the version in setup.cfg")


@pytest.mark.parametrize("cls, name, why", PROPERTIES, ids=[f"{c.__name__}.{n}" for c, n, _ in PROPERTIES])
def test_the_adapter_s_properties_exist(cls, name, why):
    assert isinstance(getattr(cls, name, None), property), (
        f"DeepSpeed {deepspeed.__version__}'s {cls.__name__} has no property {name}, which {ADAPTER} reads for "
        f"{why}: adapt that function")


@pytest.mark.parametrize("cls, name, why", SOURCE_NAMES, ids=[f"{c.__name__}:{n}" for c, n, _ in SOURCE_NAMES])
def test_the_adapter_s_names_are_still_used_by_deepspeed(cls, name, why):
    source = Path(inspect.getsourcefile(cls)).read_text()
    constants = Path(inspect.getsourcefile(cls)).with_name("constants.py")
    if name not in source and constants.is_file():
        source += constants.read_text()
    checkpoint_constants = Path(inspect.getsourcefile(DeepSpeedEngine)).parent.parent / "checkpoint" / "constants.py"
    if name not in source and checkpoint_constants.is_file():
        source += checkpoint_constants.read_text()
    assert name in source, (f"DeepSpeed {deepspeed.__version__}'s {inspect.getsourcefile(cls)} no longer mentions "
                            f"{name!r}, which {ADAPTER} relies on for {why}: adapt that function")


PRIVATE = re.compile(r"\._[a-z]\w*|\bds_(?:tensor|shape|pipe_replicated|process_group|id)\b|single_partition_of_fp32_groups"
                     r"|fp32_partitioned_groups_flat|param_slice_mappings|base_optimizer_state|\.overflow\b"
                     r"|pipeline_enable_backward_allreduce|zero_pp_rank_|\bcur_scale\b|\bloss_scaler\b|\.loss_scale\b(?!\s*\()|refresh_fp32_params"
                     r"|deepspeed\.runtime\.(?!pipe\.topology)")
"""What reaching into DeepSpeed looks like: a private attribute, ZeRO's attributes and file internals, modules of
deepspeed.runtime other than its documented topology classes."""


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """The lines of a file without its docstrings and comments (they may name what the adapter does)."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docstrings.update(range(node.lineno, node.end_lineno + 1))
    return [(number, line.split("#")[0]) for number, line in enumerate(source.splitlines(), 1) if number not in docstrings]


def test_no_deepspeed_internals_outside_the_adapter():
    offenders = []
    for path in sorted((REPO / "trainer").rglob("*.py")) + sorted((REPO / "launch").rglob("*.py")):
        relative = str(path.relative_to(REPO))
        if relative in ADAPTERS:
            continue
        for number, line in _code_lines(path):
            for match in PRIVATE.finditer(line):
                if match.group().startswith("._") and not _is_deepspeed_object(line, match.start()):
                    continue
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, "DeepSpeed internals outside " + ADAPTER + ":\n" + "\n".join(offenders)




def _is_deepspeed_object(line: str, position: int) -> bool:
    """Whether `x._name` at `position` is on a DeepSpeed object (engine, optimizer): the trainer's own
    private names (self._x of its classes) are its business."""
    head = line[:position]
    receiver = re.search(r"([\w.]+)$", head)
    return receiver is not None and any(word in receiver.group(1) for word in ("engine", "optimizer"))


def test_the_grep_finds_what_it_looks_for():
    # Guards the test above against a pattern that matches nothing.
    assert PRIVATE.search("engine._take_model_step = wrapped") and _is_deepspeed_object("engine._take_model_step", 6)
    assert PRIVATE.search("flat = optimizer.single_partition_of_fp32_groups[0]")
    assert PRIVATE.search("from deepspeed.runtime.zero.stage3 import X")
    assert PRIVATE.search("scale = optimizer.loss_scaler.cur_scale") and PRIVATE.search("optimizer.loss_scale") and not PRIVATE.search("deepspeed_compat.loss_scale(o)") and PRIVATE.search("optimizer.refresh_fp32_params()")
    assert not PRIVATE.search("from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology")
    assert not _is_deepspeed_object("self._counted = 1", 4)


def test_the_expert_marks_are_deepspeed_s_moe_convention():
    """expert_param_group's keys and the `allreduce` / `group_name` marks zero_partitions_experts sets are what
    DeepSpeed's MoE helpers recognise."""
    from deepspeed.moe.utils import is_moe_param, is_moe_param_group

    from trainer.engine.deepspeed_compat import expert_group_name, expert_param_group

    param = torch.nn.Parameter(torch.zeros(2))
    group = expert_param_group({"params": [param], "weight_decay": 0.1}, ep=4)
    assert is_moe_param_group(group) and group["name"] == expert_group_name(4) and group["weight_decay"] == 0.1
    param.allreduce, param.group_name = False, group["name"]
    assert is_moe_param(param)
