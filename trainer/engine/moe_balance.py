"""The optimizer step's side of the mixture-of-experts layers (trainer/model/moe.py): the gradient scale of their
auxiliary losses, aux-loss-free balancing and the step's routing metrics.

Before a step every MoE layer on this rank learns what the engine multiplies each micro-batch's loss by before
backward, 1 / gradient accumulation steps (times the fp16 loss scale): its auxiliary losses enter the gradient by
that factor, as a term of the micro-batch's loss would. After the step each layer's tokens per expert, counted
over the step's micro-batches, are summed over the dp x cp ranks, and every layer's expert_bias moves
rate * sign(mean load - load): the counts, and so the bias, are the same on every data-parallel and tensor
rank (tensor ranks route the same tokens alike). A skipped step (non-finite loss or gradient norm) leaves the
bias as it was, as it leaves the weights.

The metrics, over every MoE layer of every pipeline stage (summed over the pipeline ranks, so that global rank 0,
which writes them, has them all):
    moe_aux_loss        L_bal, the mean over the MoE layers and the step's micro-batches (1: balanced)
    moe_z_loss          L_z, the same mean
    moe_load_imbalance  max over layers of (max over experts of the step's tokens / the mean tokens per expert)
"""
from __future__ import annotations

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

from trainer.model.config import ModelConfig
from trainer.model.moe import GLMMoE
from trainer.parallel.comm import sum_over_
from trainer.parallel.topology import Topology


class ExpertBalancing:
    """The MoE layers of this rank's module (GLMTrainModel or this stage's part of the pipeline)."""

    def __init__(self, module: nn.Module, config: ModelConfig, topology: Topology):
        self.layers = [layer for layer in module.modules() if isinstance(layer, GLMMoE)]
        self.config, self.rate = config, config.moe_bias_update_rate
        # the ranks that route different tokens of the same layers: dp x cp (each cp rank routes its chunks of a row)
        self.dp, self.dp_group, self.pp_group = topology.dp * topology.cp, topology.dp_cp_group, topology.pp_group
        self.device = get_accelerator().current_device_name()

    def start_step(self, micro_batches: int, loss_scale: float = 1.0) -> None:
        """Before the step's first forward: the gradient scale of the auxiliary losses (module docstring)."""
        for layer in self.layers:
            layer.loss_grad_scale = loss_scale / micro_batches

    def finish_step(self, update_bias: bool) -> dict:
        """After the optimizer step, on every rank (collectives over the dp x cp and pipeline groups): move
        the biases if update_bias, and return the step's metrics (module docstring)."""
        experts = self.config.moe_num_experts
        blocks = self.config.num_layers + self.config.mtp_layers  # the MTP layer's block is block N (0-based)
        load = torch.zeros(blocks, experts, dtype=torch.long, device=self.device)  # [N + mtp, E]
        losses = torch.zeros(blocks, 2, device=self.device)  # [N + mtp, (L_bal, L_z)] per micro-batch
        for layer in self.layers:
            stats = layer.take_statistics()
            if stats is not None:
                load[layer.layer_index] = stats.load
                losses[layer.layer_index] = torch.stack([stats.balance_loss, stats.z_loss]) / stats.micro_batches
        sum_over_(load, self.dp_group)
        if update_bias and self.rate:
            for layer in self.layers:
                layer.router.update_bias_(load[layer.layer_index], self.rate)
        sum_over_(losses, self.dp_group)
        sum_over_(load, self.pp_group)
        sum_over_(losses, self.pp_group)
        moe = [index for index in range(blocks) if self.config.is_moe_layer(index)]
        load, losses = load[moe].float(), losses[moe] / self.dp
        imbalance = (load.max(dim=1).values / load.mean(dim=1).clamp_min(1e-9)).max()
        return {"moe_aux_loss": float(losses[:, 0].mean()), "moe_z_loss": float(losses[:, 1].mean()),
                "moe_load_imbalance": float(imbalance)}
