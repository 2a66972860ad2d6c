"""The memory model: bytes one device needs for its pipeline stage under a 3D layout and a ZeRO stage,
and the host memory its offloaded states take.

For a stage holding P parameters (this tensor-parallel rank's share), N = dp x cp (DeepSpeed's data-parallel
ranks, over which ZeRO partitions: trainer/engine/ds_topology.py), (w, g) = (2, 2) bytes per weight and gradient
in bf16 / fp16 and (4, 4) in fp32, the device holds what follows. In a mixture-of-experts model the routed
experts' X of the P parameters are split over ep as well as tp (each rank holds E / ep experts of every MoE
layer: X = the experts' parameters / (tp * ep)), and ZeRO shards their gradients and optimizer states over the
edp = dp * cp / ep ranks that hold the same experts instead of N: every "P / N" below is (P - X) / N + X / edp
(the non-expert parameters as without experts).

    ZeRO-0 / 1  weights w P, gradients g P, optimizer o P / (N if ZeRO-1 else 1)
                o = 12 in bf16 / fp16: fp32 master weights and Adam's m and v (4 + 4 + 4 bytes)
                  = 8  in fp32 without ZeRO: the weights are the master copy
                  = 12 in fp32 with ZeRO-1: DeepSpeed's optimizer keeps its own fp32 copy of its partition
    ZeRO-2      weights w P, gradients g P / N + g min(B, P), optimizer 16 P / N
                (the partition of the gradients and DeepSpeed's reduce bucket of B = reduce_bucket_size
                elements; master, m, v and the fp32 gradient partition the step reads, 4 + 4 + 4 + 4)
    ZeRO-3      weights w (P - Q) / N + w Q + w min(P, L + F, M), gradients g P / N + 2 g min(B, P),
                optimizer 16 P / N
                (Q: the parameters DeepSpeed keeps whole, the 1-D ones below param_persistence_threshold:
                biases and norms; the working set of gathered weights: the largest tensor L plus the prefetch
                bucket F = stage3_prefetch_bucket_size, at most M = stage3_max_live_parameters; the reduce
                bucket and reduce_scatter_coalesced's flat copy of it)

Offload moves states to host memory (per rank; a node needs that times its ranks):

    offload_optimizer cpu   ZeRO-1 / 2: (16 + w) P / N on the host (master, m, v, the fp32 gradient
                            partition, a half-precision staging copy of the weights), + g P / N with
                            gradient accumulation (DeepSpeed's accumulated_grads_in_cpu); the device keeps
                            the weights and, for ZeRO-2, only the reduce bucket of the gradients.
                            ZeRO-3: (16 + g) P / N on the host (the gradient partitions too); the device
                            keeps the weight partition, the working set and the buckets.
    offload_params cpu      ZeRO-3: + w (P - Q) / N: the weight partition lives on the host too
    nvme                    only DeepSpeed's pinned host buffers: 16 min(S, P / N) + g P / N for the
                            optimizer (one sub-group of S = sub_group_size elements swapped in for CPU Adam,
                            the gradient partitions), 5 * 1e8 * w for the weights (its default aio buffers)

Activations and the total:

    activations = in_flight * saved_per_micro_batch + recompute
                  in_flight = min(pp - stage, grad_accum): 1F1B keeps stage i's activations of up to
                  pp - i micro-batches alive (stage 0 the most); without recomputation a micro-batch
                  saves every block's tensors for backward; with recomputation every k blocks it saves
                  only each segment's input [b, s, h], and backward recomputes one segment (k blocks)
                  of one micro-batch at a time
                  sequence parallelism (tp > 1): what a block saves outside attention and the MLP (the
                  norms' and column-parallel layers' inputs, the norms' statistics, the residual dropout
                  masks), the segment inputs and the embedding's dropout mask are this rank's s/tp tokens
                  context parallelism (cp): every per-token tensor holds s / cp tokens of each row; attention
                  keeps the whole row's K and V (all-gathered) and its rows of the mask and scores (s / cp
                  queries x s keys)
    device      = (1 + MARGIN) * (weights + gradients + optimizer + working set + activations) + reserve
    host        = (1 + MARGIN) * offloaded states, per rank

MARGIN covers allocator fragmentation and the transient buffers of backward (a gradient being
formed, the logits' gradient). The reserve is RUNTIME_RESERVE on a GPU (the CUDA context, communication
buffers, the process) and CPU_RUNTIME_RESERVE for a CPU rank: the resident set of a process that has
imported torch and DeepSpeed and joined a gloo group, measured (launch/memory_check.py). The
estimate counts live tensors, what a GPU's caching allocator holds; on a CPU rank glibc's default
adaptive mmap threshold also keeps freed heap resident, which the memory check turns off
(docs/LAUNCH.md: the measurements, and what that retention adds). Activations are counted tensor by tensor
as this trainer's model saves them (block_activation_bytes); docs/LAUNCH.md compares the count with a
measured model, and the totals of ZeRO-2 and ZeRO-3 CPU runs with their measured peak resident memory.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from trainer.config import Config
from trainer.engine.ds_config import effective_zero_stage, read_user_config
from trainer.engine.partition import blocks_per_stage
from trainer.model.config import ModelConfig
from trainer.parallel.mesh import Layout as ParallelLayout

MARGIN = 0.10
RUNTIME_RESERVE = 1 << 30
CPU_RUNTIME_RESERVE = 320 * 10 ** 6
"""Measured: 319-320 MB resident in every rank measured (python 3.11, torch 2.13.0+cpu, deepspeed 0.19.8,
after deepspeed.init_distributed on gloo with DeepSpeed's shared-memory op loaded; docs/LAUNCH.md)."""
NVME_PARAM_BUFFERS = 5 * 10 ** 8
"""Elements of DeepSpeed's default pinned buffers for weights on NVMe (offload_param buffer_count 5 x
buffer_size 1e8)."""


@dataclass(frozen=True)
class ZeroBuckets:
    """DeepSpeed's ZeRO sizes, in elements (its defaults; a train.deepspeed_config may set them)."""

    reduce_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_param_persistence_threshold: int = 100_000
    sub_group_size: int = 1_000_000_000

    @classmethod
    def from_config(cls, config: Config) -> "ZeroBuckets":
        if not config.train.deepspeed_config:
            return cls()
        given = read_user_config(config.train.deepspeed_config).get("zero_optimization", {})
        names = {field.name for field in dataclasses.fields(cls)}
        aliases = {"prefetch_bucket_size": "stage3_prefetch_bucket_size",
                   "max_live_parameters": "stage3_max_live_parameters",
                   "param_persistence_threshold": "stage3_param_persistence_threshold"}
        chosen = {aliases.get(key, key): int(value) for key, value in given.items() if aliases.get(key, key) in names}
        return cls(**chosen)


@dataclass(frozen=True)
class Workload:
    """What the memory depends on besides the layout."""

    model: ModelConfig
    seq_length: int
    precision: str
    dropout_mask_bytes: int = 1
    """Bytes per element of a saved dropout mask: 1 on GPUs (a bool mask); PyTorch's CPU dropout
    keeps a mask in the activation dtype, so CPU ranks need activation_bytes."""
    on_cpu: bool = False
    """CPU ranks (gloo): the device is the host and the reserve is CPU_RUNTIME_RESERVE (module docstring)."""
    buckets: ZeroBuckets = ZeroBuckets()

    @classmethod
    def from_config(cls, config: Config, on_cpu: bool = False) -> "Workload":
        precision = config.train.precision
        mask_bytes = (4 if precision == "fp32" else 2) if on_cpu else 1
        return cls(config.model, config.data.seq_length, precision, mask_bytes, on_cpu, ZeroBuckets.from_config(config))

    @property
    def activation_bytes(self) -> int:
        """Bytes of one activation element: 4 in fp32, 2 in bf16 / fp16."""
        return 4 if self.precision == "fp32" else 2

    @property
    def reserve(self) -> int:
        return CPU_RUNTIME_RESERVE if self.on_cpu else RUNTIME_RESERVE


@dataclass(frozen=True)
class Layout(ParallelLayout):
    """A parallel layout (the sizes tp, pp, dp and their rank order: trainer/parallel/mesh.py) with its
    schedule: micro_batch * grad_accum * dp samples per step, activations recomputed every recompute_interval
    blocks (0 = never), the ZeRO stage asked for (the engine runs effective_zero_stage of it) and where the
    optimizer states and the weights are offloaded (none, cpu, nvme)."""

    micro_batch: int
    grad_accum: int
    recompute_interval: int
    zero_stage: int = 1
    offload_optimizer: str = "none"
    offload_params: str = "none"
    sequence_parallel: bool = False
    """parallel.sequence_parallel: the activations outside attention and the MLP split over the tp ranks."""


@dataclass(frozen=True)
class StageMemory:
    """The estimate for one device of one pipeline stage, in bytes; `host` is what one rank of it keeps
    in host memory (offloaded states)."""

    stage: int
    blocks: int
    parameters: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    working_set: int = 0
    """ZeRO-3: the gathered weights DeepSpeed keeps live."""
    host_states: int = 0
    reserve: int = RUNTIME_RESERVE

    @property
    def total(self) -> int:
        counted = self.weights + self.gradients + self.optimizer_states + self.working_set + self.activations
        return math.ceil((1 + MARGIN) * counted) + self.reserve

    @property
    def host(self) -> int:
        return math.ceil((1 + MARGIN) * self.host_states)

    def to_dict(self) -> dict:
        fields = ("stage", "blocks", "parameters", "weights", "gradients", "optimizer_states", "working_set",
                  "activations", "reserve")
        out = {name: getattr(self, name) for name in fields}
        out.update(total=self.total, total_gb=round(self.total / 1e9, 2), host=self.host,
                   host_gb=round(self.host / 1e9, 2))
        return out


def block_parameters(model: ModelConfig, tp: int, layer_index: int = 0, ep: int = 1) -> int:
    """Parameters of block layer_index (0-based) on one rank (ModelConfig.block_parameters: the split ones over
    tp, the replicated ones whole, the routed experts over tp * ep)."""
    return model.block_parameters(layer_index).per_rank(tp, ep)


def stage_layers(model: ModelConfig, pp: int, stage: int) -> range:
    """The blocks (0-based) of `stage`, and on the last stage the MTP layers' blocks after them (block num_layers
    + depth - 1: they run after the final hidden state, beside the output layer)."""
    counts = blocks_per_stage(model.num_layers, pp)
    first = sum(counts[:stage])
    return range(first, first + counts[stage] + (model.mtp_layers if stage == pp - 1 else 0))


def _checked_layers(model: ModelConfig, pp: int, stage: int, blocks: int) -> range:
    """stage_layers, after checking that the caller's block count is the partition's."""
    layers = stage_layers(model, pp, stage)
    expected = blocks_per_stage(model.num_layers, pp)[stage]
    if blocks != expected:
        raise ValueError(f"stage {stage} of {pp} holds {expected} blocks (trainer/engine/partition.py), not {blocks}")
    return layers


def stage_expert_parameters(model: ModelConfig, tp: int, pp: int, stage: int, ep: int = 1) -> int:
    """The routed experts' parameters on one rank of the stage (part of stage_parameters): E / ep experts of
    every MoE block, each split over tp."""
    return sum(model.block_parameters(i).experts // (tp * ep) for i in stage_layers(model, pp, stage))


def stage_parameters(model: ModelConfig, tp: int, pp: int, stage: int, blocks: int, ep: int = 1) -> int:
    """Parameters on one rank of a stage: its `blocks` blocks (those trainer/engine/partition.py gives it), plus
    the word embedding (and learned position tables) on the first stage, plus the final norm, the output layer
    (tied: a second copy of the word embedding when pp > 1; untied: its own weight) and the MTP layers on the
    last, which at pp > 1 hold a copy of the word embedding for token t+1 also when the output layer is untied
    (trainer/engine/pipeline.py)."""
    h = model.hidden_size
    layers = _checked_layers(model, pp, stage, blocks)
    word = model.padded_vocab_size(tp) * h // tp
    count = sum(block_parameters(model, tp, i, ep) for i in layers)
    if stage == 0:
        count += word
        if model.position_embedding == "learned_2d":
            count += 2 * model.max_sequence_length * h
    if stage == pp - 1:
        count += model.norm_parameters + (word if pp > 1 or not model.tie_word_embeddings else 0)
        count += model.mtp_layers * (2 * h * h // tp + 3 * model.norm_parameters)  # eh_proj, enorm, hnorm, its norm
        if model.mtp_layers and pp > 1 and not model.tie_word_embeddings:
            count += word  # the MTP layer's copy of the word embedding, tied to the first stage's
    return count


def block_activation_bytes(work: Workload, tp: int, micro_batch: int, layer_index: int = 0,
                           sequence_parallel: bool = False, cp: int = 1) -> int:
    """Bytes block layer_index (0-based) saves for backward for one micro-batch (no recomputation).

    With e = bytes per element, s b h = tokens on this rank (seq / cp) * micro-batch * hidden, r = the row's
    seq (r = s without context parallelism), a = heads, f = ffn width, and p = tp with sequence parallelism
    (each rank keeps its s/tp tokens of these), else 1:
      e s b h * 4 / p    inputs of the two LayerNorms and of the two column-parallel matmuls (replicated)
      e b h (2 s + 2 r) / tp   q and the context entering the dense layer (this rank's heads and tokens), k and v
                         of the whole row (this rank's heads; all-gathered over cp)
      e s b f * m / tp   the MLP: GeLU input and ffn -> h input (m = 2); GeGLU: both halves, the GeLU
                         output and the product (m = 4)
      s r b              the attention mask [b, 1, s, r] (bool), built in every block
      4 e s b d          RoPE's cos and sin for q and k (d = head dim), when RoPE is on
      16 s b / p         the two LayerNorms' fp32 mean and 1/std
      attention core     fused scaled_dot_product_attention: its output e s b h / tp and the fp32
                         log-sum-exp 4 a s b / tp (no s x r matrix); GLM-130B's FP32 softmax: the fp32
                         probabilities 4 a s r b / tp, their half-precision copy (e) and, with attention
                         dropout, its mask (m) and output (e) instead of the copy
      s b h * 2 * m / p  the two residual dropout masks when hidden dropout is on (m = dropout_mask_bytes)
    With model.kv_channels the query width q = n d replaces h in the attention terms (q, k, v, the context, the
    core's output). A mixture-of-experts block (moe_activation_bytes) replaces the MLP term.
    """
    model, e = work.model, work.activation_bytes
    r, b, h, a = work.seq_length, micro_batch, model.hidden_size, model.num_attention_heads
    s = r // cp
    q = model.qkv_rows[0]
    sbh, sbq = s * b * h, s * b * q
    p = tp if sequence_parallel else 1
    mlp_factor = 4 if model.gated_mlp else 2
    mask = work.dropout_mask_bytes
    mlp = moe_activation_bytes(work, tp, micro_batch, cp) if model.is_moe_layer(layer_index) \
        else e * s * b * model.ffn_size * mlp_factor // tp
    total = e * sbh * 4 // p + e * b * q * (2 * s + 2 * r) // tp + mlp + s * r * b + 16 * s * b // p
    if model.position_embedding != "learned_2d":
        total += 4 * e * s * b * model.head_dim
    if model.fp32_softmax_layer_scaling:
        scores = a * s * r * b // tp
        total += scores * 4 + scores * ((mask + e) if model.attention_dropout > 0 else (e if e == 2 else 0))
    else:
        total += e * sbq // tp + 4 * a * s * b // tp
    if model.hidden_dropout > 0:
        total += 2 * sbh * mask // p
    return total


def moe_activation_bytes(work: Workload, tp: int, micro_batch: int, cp: int = 1) -> int:
    """Bytes a mixture-of-experts MLP saves for backward for one micro-batch, T = s b tokens (s = seq / cp, this
    rank's), e bytes per element, E experts, k chosen per token, f_e the expert width and f_s the shared experts'
    (balanced routing: under ep every rank's experts receive T k token copies on average, and under tp each copy
    is split like the dense MLP):
      8 T E + 12 T k           the router's fp32 logits and sigmoid scores, the chosen ids (int64) and weights (fp32)
      e T k (2 h + 4 f_e / tp)  per token copy: the permuted input and the expert output (weighted on return), both
                              halves of gate/up, the SiLU output and the product (as the dense gated MLP's m = 4)
      4 e T f_s / tp            the shared experts, a dense SwiGLU
    The layer's own code is trainer/model/moe.py; this count follows the contract's description of it and is not
    yet measured against it (the dense terms are: tests/test_launch_memory.py)."""
    model, e = work.model, work.activation_bytes
    tokens, k, f = work.seq_length // cp * micro_batch, model.moe_top_k, model.moe_ffn_size
    router = 8 * tokens * model.moe_num_experts + 12 * tokens * k
    routed = e * tokens * k * (2 * model.hidden_size + 4 * f // tp)
    return router + routed + 4 * e * tokens * model.moe_shared_experts * f // tp


def _ends_activation_bytes(work: Workload, tp: int, pp: int, stage: int, micro_batch: int,
                           sequence_parallel: bool = False, cp: int = 1) -> int:
    """Activations outside the blocks: on the first stage the three int64 id tensors [b, s] of the
    embedding lookups and its dropout mask; on the last the final LayerNorm's input and output, the
    logits [b, s, V/tp] (kept as the stage output) and their fp32 exponentials in the loss (s = seq / cp). With
    sequence parallelism the dropout mask and the final LayerNorm's input are this rank's s/tp tokens (its output
    is gathered whole for the output head)."""
    model, e = work.model, work.activation_bytes
    s, b, h = work.seq_length // cp, micro_batch, model.hidden_size
    r = tp if sequence_parallel else 1
    total = 0
    if stage == 0:
        total += 3 * 8 * s * b + (s * b * h * work.dropout_mask_bytes // r if model.hidden_dropout > 0 else 0)
    if stage == pp - 1:
        vocab = model.padded_vocab_size(tp) // tp
        total += e * s * b * h // r + e * s * b * h + (e + 4) * s * b * vocab
        # each MTP layer: the next-token embedding, the norms' inputs and eh_proj's [b, s, 2h] input, its own
        # final norm's input and output, and its logits with their fp32 exponentials (its block: stage_layers)
        total += model.mtp_layers * (6 * e * s * b * h + (e + 4) * s * b * vocab)
    return total


def persistent_parameters(model: ModelConfig, tp: int, pp: int, stage: int, blocks: int) -> int:
    """Parameters ZeRO-3 keeps whole on every rank: the 1-D ones (biases, norms, QK-norm gains), which stay below
    DeepSpeed's param_persistence_threshold (1e5 elements) for every shipped config. `blocks`: the stage's count
    (trainer/engine/partition.py)."""
    ffn_in = sum(model.ffn_in_rows)
    qkv_bias = sum(model.qkv_rows) // tp if model.add_qkv_bias else 0
    per_block = qkv_bias + 2 * model.norm_parameters + (2 * model.head_dim if model.qk_norm else 0)
    per_block += model.hidden_size if model.add_bias_linear else 0  # the attention output's bias
    dense_mlp = ffn_in // tp + model.hidden_size if model.add_bias_linear else 0  # the MoE MLPs have no biases
    layers = _checked_layers(model, pp, stage, blocks)
    total = sum(per_block + (0 if model.is_moe_layer(i) else dense_mlp) for i in layers)
    return total + (model.norm_parameters * (1 + 3 * model.mtp_layers) if stage == pp - 1 else 0)


def largest_tensor(model: ModelConfig, tp: int, pp: int, stage: int, ep: int = 1) -> int:
    """Elements of the largest weight on one rank of the stage: the MLP's first matrix, the routed experts' fused
    gate/up weight [E / ep, 2 f_e / tp, h] of an MoE block, or the word embedding (output layer) on the end
    stages."""
    h = model.hidden_size
    ffn_in = sum(model.ffn_in_rows)
    largest = max(ffn_in, sum(model.qkv_rows)) * h // tp
    if any(model.is_moe_layer(i) for i in stage_layers(model, pp, stage)):
        largest = max(largest, model.moe_num_experts // ep * 2 * model.moe_ffn_size // tp * h)
    if stage in (0, pp - 1):
        largest = max(largest, model.padded_vocab_size(tp) * h // tp)
    return largest


def state_bytes(work: Workload, layout: Layout, params: int, persistent: int, largest: int,
                experts: int = 0) -> dict[str, int]:
    """Weights, gradients, optimizer states, working set (device) and host_states (one rank) of `params`
    parameters, `persistent` of them kept whole by ZeRO-3, `experts` of them routed experts (sharded over edp, not
    dp) and `largest` in the largest weight, under the layout's ZeRO stage and offload: the module docstring's
    table."""
    w = g = 2 if work.precision in ("bf16", "fp16") else 4
    n, buckets = layout.dp * layout.cp, work.buckets  # ZeRO partitions over DeepSpeed's data axis, dp x cp
    zero = effective_zero_stage(layout.zero_stage, work.precision, n)
    bucket = g * min(buckets.reduce_bucket_size, params)
    shard = (params - experts) // n + experts // layout.edp  # the "P / N" of one ZeRO partition
    unpersisted = (params - experts - persistent) // n + experts // layout.edp  # the "(P - Q) / N"
    if zero <= 1:
        optimizer = (12 if w == 2 or zero == 1 else 8) * (shard if zero == 1 else params)
        out = dict(weights=w * params, gradients=g * params, optimizer_states=optimizer, working_set=0)
    elif zero == 2:
        out = dict(weights=w * params, gradients=g * shard + bucket, optimizer_states=16 * shard, working_set=0)
    else:
        gathered = min(params, largest + buckets.stage3_prefetch_bucket_size, buckets.stage3_max_live_parameters)
        out = dict(weights=w * unpersisted + w * persistent, gradients=g * shard + 2 * bucket,
                   optimizer_states=16 * shard, working_set=w * gathered)
    host = 0
    if layout.offload_optimizer == "cpu":
        host = (16 + w) * shard + (g * shard if layout.grad_accum > 1 else 0) if zero <= 2 else (16 + g) * shard
        out["optimizer_states"] = 0
        out["gradients"] = g * params if zero <= 1 else bucket * (1 if zero == 2 else 2)
    elif layout.offload_optimizer == "nvme":
        host = 16 * min(buckets.sub_group_size, shard) + g * shard
        out["optimizer_states"] = 0
        out["gradients"] = g * params if zero <= 1 else bucket * (1 if zero == 2 else 2)
    if layout.offload_params == "cpu":
        host += w * unpersisted
        out["weights"] = w * persistent
    elif layout.offload_params == "nvme":
        host += w * NVME_PARAM_BUFFERS
        out["weights"] = w * persistent
    return {**out, "host_states": host}


def stage_memory(work: Workload, layout: Layout, stage: int, blocks: int) -> StageMemory:
    """The estimate for one device of `stage` (0-based), which holds `blocks` transformer blocks (and on the last
    stage the MTP layers)."""
    model, tp, pp, ep = work.model, layout.tp, layout.pp, layout.ep
    params = stage_parameters(model, tp, pp, stage, blocks, ep)
    states = state_bytes(work, layout, params, persistent_parameters(model, tp, pp, stage, blocks),
                         largest_tensor(model, tp, pp, stage, ep), stage_expert_parameters(model, tp, pp, stage, ep))
    sp, cp = layout.sequence_parallel, layout.cp
    per_block = [block_activation_bytes(work, tp, layout.micro_batch, i, sp, cp)
                 for i in stage_layers(model, pp, stage)]
    ends = _ends_activation_bytes(work, tp, pp, stage, layout.micro_batch, sp, cp)
    k = layout.recompute_interval
    if k > 0:
        tokens = work.seq_length // cp  # this rank's share of each row
        segment_input = work.activation_bytes * tokens * layout.micro_batch * model.hidden_size
        segment_input //= tp if sp else 1  # this rank's tokens
        saved = math.ceil(len(per_block) / k) * segment_input + ends
        recompute = sum(sorted(per_block)[-k:])  # the costliest segment (MoE blocks save more than dense ones)
    else:
        saved, recompute = sum(per_block) + ends, 0
    in_flight = min(pp - stage, layout.grad_accum)
    return StageMemory(stage=stage, blocks=blocks, parameters=params, activations=in_flight * saved + recompute,
                       reserve=work.reserve, **states)
