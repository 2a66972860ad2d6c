"""The training step never makes the host wait for the device inside its micro-batches, and reads the device
once per optimizer step (docs/PERFORMANCE.md, "The step path").

A TorchDispatchMode sees every operator the step runs and counts the ones that synchronise the host with the
device: `_local_scalar_dense` (.item(), float(t), bool(t)), `nonzero`, `masked_select`, boolean-mask indexing,
`is_nonzero` / `equal`, and copies whose result is on the host but whose source is not. Each count is
attributed to the first caller outside torch: inside the micro-batches none at all may occur (the backward of the
trainer's loss is run from DeepSpeed's engine.backward, so it is attributed there); over the whole step the
trainer's own are counted, DeepSpeed's optimizer step reported beside. AdamW's step counters are excluded: torch keeps them as host tensors (capturable=False)
and reads them with .item() on the host, with no device involved; they are recognised as the optimizer
state's "step" tensors by storage address. On a CPU-only run a read of device values is a copy from host to
host, which no operator shows, so the step's deliberate read is counted where it is made: StepValues.reads
(trainer/engine/step_values.py). glm-debug, 8 micro-batches of one row (GAS 8), 3 optimizer steps.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.distributed import run_distributed
from trainer.config import load_config
from trainer.data.corpus import embedded_paragraphs_corpus
from trainer.tools.preflight import preflight

GAS, STEPS = 8, 3
SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal"}
TORCH_DIR = str(Path(torch.__file__).parent)


def _is_bool_indexing(name: str, args: tuple) -> bool:
    if name not in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _is_device_to_host(name: str, args: tuple, kwargs: dict, out) -> bool:
    if name not in ("aten._to_copy", "aten.copy_") or not args or not isinstance(args[0], torch.Tensor):
        return False
    source = args[1] if name == "aten.copy_" else args[0]
    target = args[0] if name == "aten.copy_" else out
    return (isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor)
            and target.device.type == "cpu" and source.device.type != "cpu")


def _caller() -> str:
    """'trainer', 'deepspeed' or 'other': who, outside torch, made the call."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename
        if name.startswith(TORCH_DIR) or name == __file__:
            continue
        return "trainer" if "/trainer/" in name else "deepspeed" if "/deepspeed/" in name else "other"
    return "other"


class SyncCounter(TorchDispatchMode):
    """Counts syncing operators by (caller, micro-batch number within the step, operator)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.optimizer = optimizer
        self.micro_batch = 0
        self.events: list[tuple[str, int, str]] = []

    def _is_step_counter(self, tensor) -> bool:
        steps = {state["step"].data_ptr() for state in self.optimizer.state.values()
                 if isinstance(state.get("step"), torch.Tensor)}
        return isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.data_ptr() in steps

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket._qualified_op_name.replace("::", ".")  # e.g. aten.nonzero
        syncing = (name in SYNCING or _is_bool_indexing(name, args) or _is_device_to_host(name, args, kwargs, out))
        if syncing and not (name == "aten._local_scalar_dense" and self._is_step_counter(args[0])):
            self.events.append((_caller(), self.micro_batch, name))
        return out


def _count(rank, world_size, config, out_path):
    from trainer.engine.loop import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(config)
    counter = SyncCounter(trainer.engine.optimizer)

    def next_micro_batch(*_):
        counter.micro_batch += 1

    trainer.engine.module.register_forward_pre_hook(next_micro_batch)
    steps = []
    for _ in range(STEPS):
        counter.micro_batch, counter.events = 0, []
        values = getattr(trainer, "values", None)
        reads_before = values.reads if values is not None else 0
        with counter:
            trainer.train_step()
        steps.append({"events": counter.events, "micro_batches": counter.micro_batch,
                      "reads": (values.reads if values is not None else 0) - reads_before})
    out_path.write_text(json.dumps(steps))


def test_no_host_sync_in_micro_batches_and_one_read_per_step(tmp_path):
    overrides = ["parallel.micro_batch_size=1", f"parallel.global_batch_size={GAS}", f"train.steps={STEPS}",
                 f"data.path={embedded_paragraphs_corpus()}", "train.save_interval=0",
                 f"train.run_dir={tmp_path / 'run'}"]
    config = preflight(load_config("configs/glm-debug.yaml", overrides), 1)
    out = tmp_path / "counts.json"
    run_distributed(_count, 1, config, out)
    steps = json.loads(out.read_text())
    for step in steps:
        assert step["micro_batches"] == GAS
        trainer_syncs = [(k, op) for caller, k, op in step["events"] if caller == "trainer"]
        # Micro-batches 1 .. GAS - 1: none at all, whoever calls (the backward of the trainer's loss runs from
        # DeepSpeed's engine.backward); the last micro-batch ends with the optimizer step and the read.
        assert [event for event in step["events"] if event[1] < GAS] == [], step
        assert len(trainer_syncs) + step["reads"] <= 1, step
        assert step["reads"] == 1, step  # the step's values are read, once
    deepspeed_ops = sorted({op for step in steps for caller, _, op in step["events"] if caller != "trainer"})
    print(f"DeepSpeed's own syncing operators (not the trainer's): {deepspeed_ops}")
