"""The whole GLM, described once: the ordered pieces every form of the model is built from, the single-process
module made of them, and the loss.

    GLMEmbedding -> GLMBlock 1 .. N -> FinalLayerNorm -> output head (tied embedding or OutputLayer)  | GLMLoss
`glm_pieces` is that description, and the output head is chosen there only. GLMModel builds its modules from
it and runs them in its order (one process, the plain engine's GLMTrainModel, glm-generate's KV-cached
decoding, glm-eval); the DeepSpeed pipeline turns each piece into a LayerSpec (trainer/engine/pipeline.py,
gpt-neox's GPT2ModelPipe), so a piece added to the description is in every form.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from trainer.model.attention import KVCache
from trainer.model.block import GLMBlock
from trainer.model.config import ModelConfig
from trainer.model.embedding import Activations, GLMEmbedding
from trainer.model.mtp import MTP_PREFIX, MTPLayer, MTPOutputs, embed_next_tokens
from trainer.model.norm import Norm
from trainer.model.output import OutputLayer, head_outputs, vocab_parallel_logits
from trainer.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from trainer.parallel.sequence import sum_grad_over_tp_

BLOCK = "block"
"""The role of a transformer block piece: run in a group of consecutive blocks (KV caches, recomputation)."""
MTP = "mtp"
"""The role of the multi-token-prediction pieces (trainer/model/mtp.py)."""


class FinalLayerNorm(Norm):
    """The normalisation after the last block (config.normalization): activations tuple -> LN(hidden) [b, s, h]
    (sequence-parallel: this tensor rank's tokens [b, s/tp, h], the gain's and bias' gradients summed over tp)."""

    def __init__(self, config: ModelConfig, tp_group=None, sequence_parallel: bool = False):
        super().__init__(config)
        if sequence_parallel:
            for param in self.parameters():
                sum_grad_over_tp_(param, tp_group)

    def forward(self, inputs: Activations) -> torch.Tensor:
        return super().forward(inputs[0])


@dataclass(frozen=True)
class Tie:
    """Pieces with one key share one module, the first piece's; `weight` names the shared parameter (the
    pipeline ties it across stages: DeepSpeed's TiedLayerSpec)."""
    key: str
    weight: str


@dataclass(frozen=True)
class Piece:
    """One step of the forward: module(*args), called on what the previous piece returned."""
    name: str
    """Its place in GLMModel, the prefix of its parameter names (the canonical names of trainer/checkpoint)."""
    module: type
    args: tuple
    role: str
    """One of "embedding", BLOCK, "final_norm", MTP, "head"."""
    tie: Optional[Tie] = None
    forward_fn: Optional[Callable] = None
    """Called as forward_fn(module, x) in place of module(x) (the tied head hands on the embedding's weight). Tied
    pieces only (DeepSpeed's TiedLayerSpec takes one, its LayerSpec does not), and never the first piece of a tie:
    DeepSpeed writes no pipeline layer file for a piece with one, and the first piece's file holds the shared
    weight (trainer/checkpoint/pipeline_files.py: layers_with_files)."""

    def build(self) -> nn.Module:
        return self.module(*self.args)


WORD_EMBEDDING = Tie("embed", "word_embeddings.weight")


def output_head(config: ModelConfig, tp_group=None, seed: int = 0, sequence_parallel: bool = False) -> Piece:
    """The output head: the word embedding again (tied; where it is a copy of its own, on the last pipeline
    stage, it carries no position tables) or an OutputLayer. Either hands on (final hidden, output weight)."""
    if config.tie_word_embeddings:
        return Piece("embedding", GLMEmbedding, (config, tp_group, seed, False, sequence_parallel), "head",
                     tie=WORD_EMBEDDING, forward_fn=head_outputs)
    return Piece("output_layer", OutputLayer, (config, tp_group, seed, sequence_parallel), "head")


def glm_pieces(config: ModelConfig, tp_group=None, seed: int = 0, ep_group=None,
               sequence_parallel: bool = False, cp_group=None) -> list[Piece]:
    """The GLM as the flat, ordered list of its pieces (the pipeline's global layer indices: 0 embedding,
    1..N blocks, N+1 final norm, N+2 output head; with model.mtp_layers = 1: N+2 the tied embedding of token t+1,
    N+3 the MTP layer, N+4 the output head); the MoE blocks' routed experts (the MTP layer's too) split over
    ep_group. sequence_parallel (parallel.sequence_parallel, with a tensor-parallel group): the hidden states
    between the embedding and the output head are split along the sequence over the group
    (trainer/parallel/sequence.py); training only: decoding builds the model without it. With a cp_group each
    rank runs its context-parallel chunks of every row (trainer/parallel/context.py); only attention talks over
    it (the MTP layer's block's too)."""
    sp = sequence_parallel
    pieces = [Piece("embedding", GLMEmbedding, (config, tp_group, seed, True, sp), "embedding", tie=WORD_EMBEDDING)]
    # A mixture-of-experts block is a GLMBlock whose MLP is GLMMoE (config.is_moe_layer): no piece of its own.
    pieces += [Piece(f"transformer.layers.{number - 1}", GLMBlock, (config, number, tp_group, seed, ep_group, sp,
                                                                               cp_group), BLOCK) for number in range(1, config.num_layers + 1)]
    if not config.mtp_layers:
        pieces.append(Piece("transformer.final_layernorm", FinalLayerNorm, (config, tp_group, sp), "final_norm"))
        return pieces + [output_head(config, tp_group, seed, sp)]
    # Multi-token prediction (trainer/model/mtp.py), before the output head it shares: the next-token ids (the
    # batch's fifth input, shifted on whole rows: mtp_batch) ride past the blocks (and the pipeline's stages: they
    # travel in the activations tuple), the final norm keeps the activations, the word embedding (tied: on a
    # pipeline's last stage a copy whose gradient DeepSpeed sums with the first stage's) embeds token t+1, the MTP
    # layer hands the head MTPOutputs (training) or the final hidden (eval).
    pieces[0] = dataclasses.replace(pieces[0], module=EmbeddingKeepingIds)
    pieces.append(Piece("transformer.final_layernorm", FinalLayerNormKeepingActivations, (config, tp_group, sp),
                        "final_norm"))
    pieces.append(Piece("embedding", GLMEmbedding, (config, tp_group, seed, False, sp), MTP, tie=WORD_EMBEDDING,
                        forward_fn=embed_next_tokens))
    pieces += [Piece(f"{MTP_PREFIX}.{depth - 1}", MTPLayer, (config, depth, tp_group, seed, ep_group, sp, cp_group),
                     MTP)
               for depth in range(1, config.mtp_layers + 1)]
    return pieces + [output_head(config, tp_group, seed, sp)]


class EmbeddingKeepingIds(GLMEmbedding):
    """The embedding piece of an MTP model: (input_ids, position_ids, block_position_ids, segments[,
    next_input_ids]) -> its activations plus the next-token ids [b, s] (the MTP layer's x_{t+1}: trainer/model/mtp.py
    mtp_batch), where the batch carries them (training; eval mode does not need them)."""

    def forward(self, inputs: Activations) -> tuple:
        return (*super().forward(inputs[:4]), *inputs[4:5])


class FinalLayerNormKeepingActivations(FinalLayerNorm):
    """The final norm of an MTP model: (LN(hidden), the rest of the activations), for the MTP layer."""

    def forward(self, inputs: tuple) -> tuple:
        return (super().forward(inputs), *inputs[1:])


def _attach(root: nn.Module, name: str, module: nn.Module) -> None:
    """Register `module` at the dotted `name` under root, creating the containers on the way (a ModuleList
    where the next part is an index, else a ModuleDict)."""
    *path, last = name.split(".")
    parent = root
    for part, following in zip(path, path[1:] + [last]):
        child = dict(parent.named_children()).get(part)
        if child is None:
            child = nn.ModuleList() if following.isdigit() else nn.ModuleDict()
            parent.add_module(part, child)
        parent = child
    parent.add_module(last, module)


class GLMLoss(nn.Module):
    """Loss = sum(CE * loss_mask) / normaliser, CE in fp32 over the vocabulary-parallel logits (padding columns
    excluded). labels are already shifted: labels[i] is predicted at position i. The normaliser is the
    target's third element if it has one (the trainer's share of the step's loss tokens:
    trainer/engine/step_loss.py), else the micro-batch's own count of loss tokens sum(loss_mask) (a token mean).
    Nothing here reads a device value on the host: which positions count comes from the batch, not from
    boolean indexing (which waits for the device to learn how many).

    With an MTP layer (trainer/model/mtp.py) the head hands over MTPOutputs in training, and the loss is
    main + mtp_loss_weight * (the MTP layer's loss over its own labels and loss mask, the target's sixth and
    seventh elements (trainer/model/mtp.py mtp_batch: shifted on whole rows), normalised by the fifth).
    `recorded` sums each such term (detached) over the calls since take_recorded(), which the trainer reads once
    per step for its metrics."""

    def __init__(self, config: ModelConfig, tp_group=None):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.tp_group = tp_group
        self.mtp_loss_weight = config.mtp_loss_weight
        self.term_names: tuple[str, ...] = ("mtp_loss",) if config.mtp_layers else ()
        """The terms a training forward records (on the pipeline's last stage only: the one that computes the loss)."""
        self.recorded: dict[str, torch.Tensor] = {}
        self.calls = 0

    def forward(self, outputs, target: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """outputs: logits [b, s, V_pad / tp], or (hidden [b, s, h] or MTPOutputs, the output weight
        [V_pad / tp, h]) as the output head hands them over (trainer/model/output.py), in which case the logits
        are computed chunk by chunk inside the loss (vocab_parallel_linear_cross_entropy: no [b, s, V] fp32 copy);
        target (labels [b, s], loss_mask [b, s] [, normaliser: a 0-dim fp32 tensor, loss_positions [n]: the flat
        indices of the loss tokens, collate's; then the main logits are computed at those positions only (Part B:
        15-30% of a GLM sample) [, the MTP layer's normaliser, labels [b, s] and loss mask [b, s]]])."""
        labels, loss_mask = target[:2]
        normaliser = target[2] if len(target) > 2 else loss_mask.sum()
        positions = target[3] if len(target) > 3 else None
        if not (isinstance(outputs, tuple) and isinstance(outputs[0], tuple)):
            return self.token_loss(outputs, labels, loss_mask, normaliser, positions)
        # MTPOutputs, or its fields as a plain tuple: a pipeline with recomputation re-packs what each range of
        # layers returns (DeepSpeed's PipelineModule calls the next range with *outputs)
        handover, weight = MTPOutputs(*outputs[0]), outputs[1]
        main = self.token_loss((handover.main, weight), labels, loss_mask, normaliser, positions)
        if len(target) < 7:
            raise ValueError("the MTP layer's loss needs its normaliser, labels and loss mask in the target: build "
                             "the batch with trainer/engine/loop.py's micro_batches(..., mtp=True)")
        mtp = self.token_loss((handover.mtp, weight), target[5], target[6], target[4])
        self.record({"mtp_loss": mtp})
        return main + self.mtp_loss_weight * mtp

    def token_loss(self, outputs, labels: torch.Tensor, loss_mask: torch.Tensor, normaliser: torch.Tensor,
                   positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum(CE * loss_mask) / normaliser of logits or (hidden, output weight) (forward's outputs); with
        `positions` [n] (flat indices of the loss tokens) the (hidden, weight) form scores those positions only."""
        if isinstance(outputs, tuple):
            hidden, weight = outputs
            hidden = hidden.reshape(-1, hidden.shape[-1])  # [b * s, h]
            labels, weights = labels.reshape(-1), loss_mask.reshape(-1)  # [b * s]
            if positions is not None:
                hidden, labels, weights = hidden[positions], labels[positions], weights[positions]  # [n, h], [n]
            summed = vocab_parallel_linear_cross_entropy(hidden, weight, labels, weights.float(), self.tp_group,
                                                         vocab_size=self.vocab_size)
        else:
            per_token = vocab_parallel_cross_entropy(outputs, labels, self.tp_group, vocab_size=self.vocab_size)
            summed = (per_token * loss_mask.to(per_token.dtype)).sum()
        return summed / normaliser.to(summed.dtype).clamp_min(torch.finfo(summed.dtype).tiny)  # none: 0

    def record(self, terms: dict[str, torch.Tensor]) -> None:
        """Add each term's value (detached) to `recorded`, one call counted."""
        for name, value in terms.items():
            self.recorded[name] = self.recorded.get(name, 0.0) + value.detach().float()
        self.calls += 1

    def take_recorded(self) -> tuple[dict[str, torch.Tensor], int]:
        """(the summed terms, the calls that recorded them) since the last take; both reset."""
        taken = (self.recorded, self.calls)
        self.recorded, self.calls = {}, 0
        return taken


class GLMModel(nn.Module):
    """GLM on one pipeline stage, built from glm_pieces. Parameter names follow THUDM/GLM below the top level:
    embedding.word_embeddings, embedding.{block_,}position_embeddings, transformer.layers.{i}.*,
    transformer.final_layernorm, and output_layer.weight when the output layer is untied."""

    def __init__(self, config: ModelConfig, tp_group=None, seed: int = 0, ep_group=None,
                 sequence_parallel: bool = False, cp_group=None):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        shared: dict[str, nn.Module] = {}
        sequence = []
        for piece in glm_pieces(config, tp_group, seed, ep_group, sequence_parallel, cp_group):
            if piece.tie is not None and piece.tie.key in shared:
                sequence.append((piece, shared[piece.tie.key]))  # the tied head is the embedding module
                continue
            module = piece.build()
            _attach(self, piece.name, module)
            if piece.tie is not None:
                shared[piece.tie.key] = module
            sequence.append((piece, module))
        self._sequence = tuple(sequence)  # a tuple: not registered again under another name
        if not hasattr(self, "output_layer"):
            self.output_layer: Optional[OutputLayer] = None  # tied: the embedding is the output layer

    @property
    def head(self) -> nn.Module:
        """The output head's module: the word embedding (tied) or the OutputLayer."""
        return next(module for piece, module in self._sequence if piece.role == "head")

    @property
    def output_weight(self) -> torch.Tensor:
        """The output head's weight [V_pad / tp, h]."""
        return self.head.output_weight

    def kv_caches(self) -> list[KVCache]:
        """Empty KV caches, one per block, for head_inputs' incremental decoding."""
        return [KVCache() for piece, _ in self._sequence if piece.role == BLOCK]

    def run_blocks(self, blocks: Sequence[nn.Module], activations: Activations,
                   kv_caches: Optional[Sequence[KVCache]] = None) -> Activations:
        """Consecutive blocks on the activations tuple, each with its KV cache if given."""
        for index, block in enumerate(blocks):
            activations = block(activations) if kv_caches is None else block(activations, kv_caches[index])
        return activations

    def head_inputs(self, inputs: Activations, kv_caches: Optional[Sequence[KVCache]] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pieces in order: (input_ids, position_ids, block_position_ids [b, s], segments [b, 2, s]) ->
        (final hidden [b, s, h], output weight [V_pad / tp, h]), what the head hands to the logits or the loss.
        With kv_caches (self.kv_caches()) the inputs hold only the new positions (KV-cached decoding), which a
        sequence-parallel model does not serve (decoding builds the model without it)."""
        if kv_caches is not None and self.sequence_parallel:
            raise ValueError("KV-cached decoding runs without sequence parallelism: build the model with "
                             "sequence_parallel=False")
        x, caches = inputs, iter(kv_caches) if kv_caches is not None else None
        for is_block, run in groupby(self._sequence, key=lambda item: item[0].role == BLOCK):
            run = list(run)
            if is_block:  # consecutive blocks run as one group: KV caches, recomputation (GLMTrainModel)
                blocks = [module for _, module in run]
                x = self.run_blocks(blocks, x, None if caches is None else [next(caches) for _ in blocks])
                continue
            for piece, module in run:
                x = module(x) if piece.forward_fn is None else piece.forward_fn(module, x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden [b, s, h] -> this rank's logits [b, s, V_pad / tp], by the output head."""
        return vocab_parallel_logits(*head_outputs(self.head, hidden), self.tp_group)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, block_position_ids: torch.Tensor,
                segments: torch.Tensor, kv_caches: Optional[Sequence[KVCache]] = None) -> torch.Tensor:
        """Token and position ids [b, s], segments [b, 2, s] (trainer/model/mask.py; one sample per row:
        segments_of_sep) -> this rank's logits [b, s, V_pad / tp]."""
        hidden, weight = self.head_inputs((input_ids, position_ids, block_position_ids, segments), kv_caches)
        if isinstance(hidden, MTPOutputs):  # a model in training mode: the main model's logits
            hidden = hidden.main
        return vocab_parallel_logits(hidden, weight, self.tp_group)
