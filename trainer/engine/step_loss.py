"""The optimizer step's loss: the mean cross-entropy over every loss token of the step, whatever the
micro-batch size, the number of data-parallel ranks or how packing lays samples into rows (Megatron-LM's
--calculate-per-token-loss, torchtitan).

    loss_step = sum over micro-batches k, data-parallel ranks r, tokens t of CE_krt * mask_krt  /  N_step
N_step, the step's loss tokens, is summed over the data-parallel ranks once per step (one collective of one
integer, before the first micro-batch). A mean per micro-batch would weight a token by 1 / (its micro-batch's
loss tokens), so the same global batch would give another loss and gradient at another micro-batch size.

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

import torch

from trainer.parallel.comm import sum_count
from trainer.parallel.topology import Topology


def loss_replicas(topology: Topology) -> int:
    """The ranks DeepSpeed averages the loss and the gradients over: dp x cp."""
    return topology.dp * topology.cp


def step_normaliser(micro_batches: list[dict], topology: Topology) -> torch.Tensor:
    """This rank's collated micro-batches of one step (whole rows) -> GLMLoss's normaliser
    N_step / (GAS * dp * cp), a 0-dim fp32 tensor (module docstring). Every rank of the step calls it (a
    collective over the dp ranks)."""
    local = sum(int(batch["loss_mask"].sum()) for batch in micro_batches)
    loss_tokens = sum_count(local, topology.dp_group)
    # GAS * dp * cp: undoes DeepSpeed's mean over the micro-batches and its data-parallel (dp x cp) ranks.
    return torch.tensor(loss_tokens / (len(micro_batches) * loss_replicas(topology)), dtype=torch.float32)
