"""The memory model: bytes one GPU needs for its pipeline stage under a 3D layout.

For a stage holding P parameters (this tensor-parallel rank's share) the estimate is

    states      = P * (w + g) + P * o / (dp if ZeRO-1 else 1)
                  (w, g, o) = (2, 2, 12) in bf16 / fp16: half weights and gradients; fp32 master
                              weights and Adam's m and v (4 + 4 + 4 bytes) in the optimizer
                            = (4, 4, 8)  in fp32 without ZeRO: the weights are the master copy
                            = (4, 4, 12) in fp32 with ZeRO-1: DeepSpeed's optimizer still keeps its own
                              fp32 copy of the partition it updates
    activations = in_flight * saved_per_micro_batch + recompute
                  in_flight = min(pp - stage, grad_accum): 1F1B keeps stage i's activations of up to
                  pp - i micro-batches alive (stage 0 the most); without recomputation a micro-batch
                  saves every block's tensors for backward; with recomputation every k blocks it saves
                  only each segment's input [b, s, h], and backward recomputes one segment (k blocks)
                  of one micro-batch at a time
    total       = (1 + MARGIN) * (states + activations) + RUNTIME_RESERVE

MARGIN covers allocator fragmentation and the transient buffers of backward (a gradient being
formed, the logits' gradient); RUNTIME_RESERVE the CUDA context, communication buffers and the
Python process. Activations are counted tensor by tensor as this trainer's model saves them
(block_activation_bytes); docs/LAUNCH.md compares the count with a measured model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.config import Config
from trainer.engine.ds_config import effective_zero_stage
from trainer.model.config import ModelConfig

MARGIN = 0.10
RUNTIME_RESERVE = 1 << 30


@dataclass(frozen=True)
class Workload:
    """What the memory depends on besides the layout."""

    model: ModelConfig
    seq_length: int
    precision: str
    zero_stage: int
    dropout_mask_bytes: int = 1
    """Bytes per element of a saved dropout mask: 1 on GPUs (a bool mask); PyTorch's CPU dropout
    keeps a mask in the activation dtype, so CPU ranks need activation_bytes."""

    @classmethod
    def from_config(cls, config: Config, on_cpu: bool = False) -> "Workload":
        precision = config.train.precision
        mask_bytes = (4 if precision == "fp32" else 2) if on_cpu else 1
        return cls(config.model, config.data.seq_length, precision, config.optim.zero_stage, mask_bytes)

    @property
    def activation_bytes(self) -> int:
        """Bytes of one activation element: 4 in fp32, 2 in bf16 / fp16."""
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class Layout:
    """A 3D layout: tp * pp * dp processes, micro_batch * grad_accum * dp samples per step,
    activations recomputed every recompute_interval blocks (0 = never)."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    grad_accum: int
    recompute_interval: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class StageMemory:
    """The estimate for one GPU of one pipeline stage, in bytes."""

    stage: int
    blocks: int
    parameters: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int

    @property
    def total(self) -> int:
        counted = self.weights + self.gradients + self.optimizer_states + self.activations
        return math.ceil((1 + MARGIN) * counted) + RUNTIME_RESERVE

    def to_dict(self) -> dict:
        fields = ("stage", "blocks", "parameters", "weights", "gradients", "optimizer_states", "activations")
        out = {name: getattr(self, name) for name in fields}
        out["total"] = self.total
        out["total_gb"] = round(self.total / 1e9, 2)
        return out


def block_parameters(model: ModelConfig, tp: int) -> int:
    """Parameters of one transformer block on one tensor-parallel rank (ModelConfig.block_parameters: the
    split ones over tp, the replicated ones whole)."""
    split, replicated = model.block_parameters()
    return split // tp + replicated


def stage_parameters(model: ModelConfig, tp: int, pp: int, stage: int, blocks: int) -> int:
    """Parameters on one rank of a stage: its blocks, plus the word embedding (and learned position
    tables) on the first stage, plus the final norm and the output layer on the last (tied: a second copy
    of the word embedding when pp > 1; untied: its own weight)."""
    h = model.hidden_size
    word = model.padded_vocab_size(tp) * h // tp
    count = blocks * block_parameters(model, tp)
    if stage == 0:
        count += word
        if model.position_embedding == "learned_2d":
            count += 2 * model.max_sequence_length * h
    if stage == pp - 1:
        count += model.norm_parameters + (word if pp > 1 or not model.tie_word_embeddings else 0)
    return count


def block_activation_bytes(work: Workload, tp: int, micro_batch: int) -> int:
    """Bytes one block saves for backward for one micro-batch (no recomputation).

    With e = bytes per element, s b h = seq * micro-batch * hidden, a = heads, f = ffn width:
      e s b h * 4        inputs of the two LayerNorms and of the two column-parallel matmuls (replicated)
      e s b h * 4 / tp   q, k, v and the context entering the dense layer (this rank's heads)
      e s b f * m / tp   the MLP: GeLU input and ffn -> h input (m = 2); GeGLU: both halves, the GeLU
                         output and the product (m = 4)
      s s b              the attention mask [b, 1, s, s] (bool), built in every block
      4 e s b d          RoPE's cos and sin for q and k (d = head dim), when RoPE is on
      16 s b             the two LayerNorms' fp32 mean and 1/std
      attention core     fused scaled_dot_product_attention: its output e s b h / tp and the fp32
                         log-sum-exp 4 a s b / tp (no s x s matrix); GLM-130B's FP32 softmax: the fp32
                         probabilities 4 a s s b / tp, their half-precision copy (e) and, with attention
                         dropout, its mask (m) and output (e) instead of the copy
      s b h * 2 * m      the two residual dropout masks when hidden dropout is on (m = dropout_mask_bytes)
    """
    model, e = work.model, work.activation_bytes
    s, b, h, a = work.seq_length, micro_batch, model.hidden_size, model.num_attention_heads
    sbh = s * b * h
    mlp_factor = 4 if model.gated_mlp else 2
    mask = work.dropout_mask_bytes
    total = e * sbh * 4 + e * sbh * 4 // tp + e * s * b * model.ffn_size * mlp_factor // tp + s * s * b + 16 * s * b
    if model.position_embedding != "learned_2d":
        total += 4 * e * s * b * model.head_dim
    if model.fp32_softmax_layer_scaling:
        scores = a * s * s * b // tp
        total += scores * 4 + scores * ((mask + e) if model.attention_dropout > 0 else (e if e == 2 else 0))
    else:
        total += e * sbh // tp + 4 * a * s * b // tp
    if model.hidden_dropout > 0:
        total += 2 * sbh * mask
    return total


def _ends_activation_bytes(work: Workload, tp: int, pp: int, stage: int, micro_batch: int) -> int:
    """Activations outside the blocks: on the first stage the three int64 id tensors [b, s] of the
    embedding lookups and its dropout mask; on the last the final LayerNorm's input and output, the
    logits [b, s, V/tp] (kept as the stage output) and their fp32 exponentials in the loss."""
    model, e = work.model, work.activation_bytes
    s, b, h = work.seq_length, micro_batch, model.hidden_size
    total = 0
    if stage == 0:
        total += 3 * 8 * s * b + (s * b * h * work.dropout_mask_bytes if model.hidden_dropout > 0 else 0)
    if stage == pp - 1:
        vocab = model.padded_vocab_size(tp) // tp
        total += 2 * e * s * b * h + (e + 4) * s * b * vocab
    return total


def stage_memory(work: Workload, layout: Layout, stage: int, blocks: int) -> StageMemory:
    """The estimate for one GPU of `stage` (0-based), which holds `blocks` transformer blocks."""
    half = work.precision in ("bf16", "fp16")
    zero = effective_zero_stage(work.zero_stage, work.precision, layout.dp) >= 1
    weight_bytes, grad_bytes, optim_bytes = (2, 2, 12) if half else (4, 4, 12 if zero else 8)
    params = stage_parameters(work.model, layout.tp, layout.pp, stage, blocks)
    optimizer_shards = layout.dp if zero else 1

    per_block = block_activation_bytes(work, layout.tp, layout.micro_batch)
    ends = _ends_activation_bytes(work, layout.tp, layout.pp, stage, layout.micro_batch)
    k = layout.recompute_interval
    if k > 0:
        segment_input = work.activation_bytes * work.seq_length * layout.micro_batch * work.model.hidden_size
        saved = math.ceil(blocks / k) * segment_input + ends
        recompute = min(k, blocks) * per_block
    else:
        saved, recompute = blocks * per_block + ends, 0
    in_flight = min(layout.pp - stage, layout.grad_accum)
    return StageMemory(stage=stage, blocks=blocks, parameters=params, weights=params * weight_bytes,
                       gradients=params * grad_bytes,
                       optimizer_states=math.ceil(params * optim_bytes / optimizer_shards),
                       activations=in_flight * saved + recompute)
