"""The optimizer step's loss: the mean cross-entropy over every loss token of the step, whatever the
micro-batch size, the number of data-parallel ranks or how packing lays samples into rows (Megatron-LM's
--calculate-per-token-loss, torchtitan).

    loss_step = sum over micro-batches k, data-parallel ranks r, tokens t of CE_krt * mask_krt  /  N_step
N_step, the step's loss tokens, is summed over the data-parallel ranks once per step (one collective of two
integers, N and the real tokens, and with an MTP layer a third, its loss tokens, before the first micro-batch),
from the counts the collate step made on the host; the sum stays on the device (the loss divides by it there), so
nothing waits for it. A mean per micro-batch would weight a token by 1 / (its micro-batch's loss tokens), so the
same global batch would give another loss and gradient at another micro-batch size.

DeepSpeed divides each micro-batch's loss by the gradient accumulation steps (GAS) before its backward, and
averages the gradients (and the reported loss) over its data-parallel ranks, which are our dp x cp ranks
(trainer/engine/ds_topology.py): with context parallelism each of the cp ranks of a row sums CE * mask over
its own chunks of the row (trainer/parallel/context.py), so the rows' loss tokens are the sum over the dp x cp
ranks of their chunks'. Each micro-batch's loss is therefore sum(CE * mask) / (N_step / (GAS * dp * cp)):
after DeepSpeed's division by GAS and its mean over the dp x cp ranks the gradient and the reported loss are
exactly loss_step's. (N_step is counted on the whole rows, which every cp rank of a data-parallel rank
reads, so its sum runs over the dp ranks alone.) That divisor, the `normaliser`, rides in the
micro-batch's target (GLMLoss: trainer/model/glm.py), so the pipeline engine's last stage and the plain
engine compute the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from trainer.model.mtp import mtp_batch
from trainer.parallel.comm import sum_over_
from trainer.parallel.topology import Topology


def loss_replicas(topology: Topology) -> int:
    """The ranks DeepSpeed averages the loss and the gradients over: dp x cp."""
    return topology.dp * topology.cp


@dataclass
class StepCounts:
    """What one optimizer step's micro-batches hold over every data-parallel rank."""
    normaliser: torch.Tensor
    """GLMLoss's normaliser N_step / (GAS * dp * cp), a 0-dim fp32 tensor (on the host at dp = 1, else on the
    device)."""
    real_tokens: torch.Tensor | int
    """The real (non-padding) tokens of the step's rows on every rank: an int at dp = 1, else a 0-dim tensor on
    the device, read with the step's other values (trainer/engine/step_values.py)."""
    mtp_normaliser: Optional[torch.Tensor] = None
    """The MTP layer's normaliser, its loss tokens over the step / (GAS * dp * cp) (None without an MTP layer)."""


def mtp_batch_mask(batch: dict) -> torch.Tensor:
    """The MTP layer's loss tokens of a collated batch (trainer/model/mtp.py: labels[t+1] within t's sample),
    which its loss is the mean over (GLMLoss's fifth target element)."""
    return mtp_batch(batch["input_ids"], batch["labels"], batch["loss_mask"], batch["segment_start"]).loss_mask


def step_counts(micro_batches: list[dict], topology: Topology, device: torch.device | str,
                mtp: bool = False) -> StepCounts:
    """This rank's collated micro-batches of one step (whole rows; trainer/data/dataset.py: collate counts them)
    -> the step's counts (module docstring), with `mtp` the MTP layer's loss tokens too (counted here on the
    host, from the collated batch). Every rank of the step calls it (a collective over the dp ranks, dp > 1: the
    cp ranks of a data-parallel rank read the same whole rows, so the counts are not summed over cp)."""
    local = [sum(batch["num_loss_tokens"] for batch in micro_batches),
             sum(batch["num_tokens"] for batch in micro_batches)]
    if mtp:
        local.append(sum(int(mtp_batch_mask(batch).sum()) for batch in micro_batches))
    # GAS * dp * cp: undoes DeepSpeed's mean over the micro-batches and its data-parallel (dp x cp) ranks
    divisor = len(micro_batches) * loss_replicas(topology)
    if topology.dp_group is None:
        share = [torch.tensor(count / divisor, dtype=torch.float32) for count in local]
        return StepCounts(share[0], local[1], share[2] if mtp else None)
    counts = sum_over_(torch.tensor(local, dtype=torch.int64, device=device), group=topology.dp_group)  # [2 or 3]
    return StepCounts(counts[0].float() / divisor, counts[1], counts[2].float() / divisor if mtp else None)
