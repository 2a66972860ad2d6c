"""The optimizer step's loss: the mean cross-entropy over every loss token of the step, whatever the
micro-batch size, the number of data-parallel ranks or how packing lays samples into rows (Megatron-LM's
--calculate-per-token-loss, torchtitan).

    loss_step = sum over micro-batches k, data-parallel ranks r, tokens t of CE_krt * mask_krt  /  N_step
N_step, the step's loss tokens, is summed over the data-parallel ranks once per step (one collective of one
integer, before the first micro-batch). A mean per micro-batch would weight a token by 1 / (its micro-batch's
loss tokens), so the same global batch would give another loss and gradient at another micro-batch size.

DeepSpeed divides each micro-batch's loss by the gradient accumulation steps (GAS) before its backward, and
averages the gradients (and the reported loss) over the dp ranks. Each micro-batch's loss is therefore
sum(CE * mask) / (N_step / (GAS * dp)): after DeepSpeed's division by GAS and its mean over dp ranks the
gradient and the reported loss are exactly loss_step's. That divisor, the `normaliser`, rides in the
micro-batch's target (GLMLoss: trainer/model/glm.py), so the pipeline engine's last stage and the plain
engine compute the same thing.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainer.model.mtp import mtp_loss_mask
from trainer.parallel.comm import sum_count
from trainer.parallel.topology import Topology


def step_normaliser(micro_batches: list[dict], topology: Topology,
                    loss_mask: Callable[[dict], torch.Tensor] = lambda batch: batch["loss_mask"]) -> torch.Tensor:
    """This rank's collated micro-batches of one step -> GLMLoss's normaliser N_step / (GAS * dp), a 0-dim
    fp32 tensor (module docstring), N_step counted by `loss_mask(batch)` (the MTP layer's: mtp_batch_mask).
    Every rank of the step calls it (a collective over the dp ranks)."""
    local = sum(int(loss_mask(batch).sum()) for batch in micro_batches)
    loss_tokens = sum_count(local, topology.dp_group)
    # GAS * dp: undoes DeepSpeed's mean over the micro-batches and the data-parallel ranks.
    return torch.tensor(loss_tokens / (len(micro_batches) * topology.dp), dtype=torch.float32)


def mtp_batch_mask(batch: dict) -> torch.Tensor:
    """The MTP layer's loss tokens of a collated batch (trainer/model/mtp.py: labels[t+1] within t's sample),
    which its loss is the mean over (GLMLoss's fourth target element)."""
    return mtp_loss_mask(batch["loss_mask"], batch["segment_start"])
