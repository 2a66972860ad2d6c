"""GLM's attention mask, its one definition, for sequences that hold one sample or several packed ones.

A row of s tokens holds samples laid end to end (the padding after the last one counts as a sample of its
own with an empty Part A). For token i, `segment_start[i]` is where its sample starts and `segment_sep[i]`
where that sample's Part A ends (absolute indices in the row). Then

    row i sees column j  iff  segment_start[i] <= j  and  (j < segment_sep[i]  or  j <= i)

Inside a sample this is GLM's mask (Part A bidirectional within Part A, Part B causal and seeing its own
Part A); across samples it is block-diagonal: a column before the sample's start is hidden, and a column
after its end is hidden too (it lies right of both sep and i). Every row sees itself, so no row is empty.

What travels between pipeline stages is `segments` [b, 2, s] (segment_start, segment_sep stacked, by
`stack_segments` only): O(s) per row. `GLMMask` builds the kernels' forms from it once per micro-batch:
the dense bool [b, 1, s, s], SDPA's additive float mask, and FlexAttention's BlockMask, which skips the
128 x 128 tiles between two samples and above the diagonal right of every sep. A KV-cached step (decoding,
scoring) takes `GLMMask.cached`: no mask, a causal bias or, only where neither is exact, the dense rows.

Context parallelism (trainer/parallel/context.py) hands a rank only its chunks of the row: `segments` [b, 2,
s / cp] of its own tokens (their start and sep are still absolute row indices), while the keys are the whole
row's. `GLMMask.chunk(cp, rank)` is the same rule with the queries at the rank's row positions
(`chunk_positions`) and s keys: the rank's rows of the full mask, in every form. Its BlockMask is built per
chunk and skips the same hidden tiles as the full one wherever a chunk is a whole number of tiles.
"""
from __future__ import annotations

import functools
import weakref
from typing import Callable, Optional, Union

import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from trainer.parallel.context import chunk_positions


def visible(q_index: torch.Tensor, kv_index: torch.Tensor, start: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
    """The rule of the module docstring for query q_index (with its sample's start and sep) and key kv_index;
    broadcasts, so it serves the dense mask and FlexAttention's per-element mask function alike."""
    return (kv_index >= start) & ((kv_index < sep) | (kv_index <= q_index))


def stack_segments(segment_start: torch.Tensor, segment_sep: torch.Tensor) -> torch.Tensor:
    """The model's `segments` input, made here only: segment_start, segment_sep [b, s] -> [b, 2, s]."""
    return torch.stack([segment_start, segment_sep], dim=1)  # [b, 2, s]


def segments_of_sep(sep: torch.Tensor, seq_length: int) -> torch.Tensor:
    """One sample per row, starting at 0 with |Part A| = sep [b] -> segments [b, 2, s]."""
    b = sep.shape[0]
    start = torch.zeros(b, seq_length, dtype=torch.long, device=sep.device)  # [b, s]
    return stack_segments(start, sep.to(torch.long)[:, None].expand(b, seq_length))


def dense_mask(segments: torch.Tensor, num_keys: Optional[int] = None) -> torch.Tensor:
    """segments [b, 2, s_q] -> [b, 1, s_q, s_k] bool (True = may attend). Queries are the row's positions
    s_k - s_q .. s_k - 1 (s_k = num_keys, default s_q): the last rows of the full mask, as a KV-cached
    decoding step needs them."""
    s_q = segments.shape[-1]
    s_k = s_q if num_keys is None else num_keys
    q_index = torch.arange(s_k - s_q, s_k, device=segments.device)[:, None]  # [s_q, 1]
    kv_index = torch.arange(s_k, device=segments.device)[None, :]  # [1, s_k]
    start, sep = segments[:, 0, :, None], segments[:, 1, :, None]  # [b, s_q, 1] each
    return visible(q_index, kv_index, start, sep)[:, None]  # [b, 1, s_q, s_k]


@functools.cache
def _compiled_create_block_mask() -> Callable:
    return torch.compile(create_block_mask, dynamic=False)


class GLMMask:
    """The mask of one micro-batch from its segments [b, 2, s], each kernel's form built on first use and kept.
    `GLMMask.of(segments)` hands every caller the same object while they pass the same, unmodified tensor: the
    blocks of one pipeline stage (and the recomputation of a checkpointed block) share one mask per
    micro-batch instead of building one per layer.

    Queries are the row's positions 0 .. s - 1, or `query_positions` [s] (a context-parallel rank's chunks,
    made by `chunk`), against `num_keys` keys at positions 0 .. num_keys - 1 (default s)."""

    _latest: Optional[tuple[weakref.ref, int, "GLMMask"]] = None

    def __init__(self, segments: torch.Tensor, query_positions: Optional[torch.Tensor] = None,
                 num_keys: Optional[int] = None):
        self.segments = segments
        self.seq_length = segments.shape[-1]
        self.query_positions = query_positions
        self.num_keys = self.seq_length if num_keys is None else num_keys
        self._dense: dict[int, torch.Tensor] = {}
        self._additive: dict[torch.dtype, torch.Tensor] = {}
        self._block_mask: Optional[BlockMask] = None
        self._chunks: dict[tuple[int, int], GLMMask] = {}

    @classmethod
    def of(cls, segments: torch.Tensor) -> "GLMMask":
        """The mask of this segments tensor: the last one built if it is the same object, unchanged since."""
        latest = cls._latest
        if latest is not None and latest[0]() is segments and latest[1] == segments._version:
            return latest[2]
        mask = cls(segments)
        cls._latest = (weakref.ref(segments), segments._version, mask)
        return mask

    def chunk(self, cp: int, rank: int) -> "GLMMask":
        """This mask's segments as context-parallel rank `rank` of `cp` holds them (its chunks of a row of
        s * cp tokens) -> the mask of its queries against the whole row's keys, kept for the next block."""
        if (cp, rank) not in self._chunks:
            row = self.seq_length * cp
            positions = chunk_positions(row, cp, rank, device=self.segments.device)  # [s]
            self._chunks[(cp, rank)] = GLMMask(self.segments, query_positions=positions, num_keys=row)
        return self._chunks[(cp, rank)]

    def dense(self, num_keys: Optional[int] = None) -> torch.Tensor:
        """[b, 1, s, s_k] bool, True = may attend; s_k = num_keys (default s) counts the positions a KV cache
        holds before these s (dense_mask), so the blocks of one decoding step share it too. A chunk's mask has
        its own queries and keys."""
        s_k = self.num_keys if num_keys is None else num_keys
        if s_k not in self._dense:
            if self.query_positions is None:
                self._dense[s_k] = dense_mask(self.segments, num_keys=s_k)
            else:
                if s_k != self.num_keys:
                    raise ValueError(f"a context-parallel chunk's mask has {self.num_keys} keys, not {s_k}")
                kv_index = torch.arange(s_k, device=self.segments.device)[None, :]  # [1, s_k]
                start, sep = self.segments[:, 0, :, None], self.segments[:, 1, :, None]  # [b, s, 1] each
                self._dense[s_k] = visible(self.query_positions[:, None], kv_index, start, sep)[:, None]
        return self._dense[s_k]

    def cached(self, num_keys: int) -> Optional[Union[torch.Tensor, CausalBias]]:
        """The mask of a KV-cached step, its s queries the row's positions num_keys - s .. num_keys - 1, in the
        smallest form SDPA takes, so that a long prompt's prefill builds no [s, s] mask:
        - None where every query sees every key (a Part A prefill: every key in Part A; a one-token step);
        - a lower-right causal bias where every query sees exactly the keys up to its own position (a causal
          prefill, sep <= 1, or Part B after a cached Part A), which SDPA runs as is_causal when s = num_keys;
        - else the dense bool [b, 1, s, num_keys].
        Rows that start at key 0 only (one sample per row: segments_of_sep); anything else is dense. It reads the
        segments on the host: decoding and scoring only, never inside a training step."""
        s = self.seq_length
        start, sep = self.segments[:, 0], self.segments[:, 1]  # [b, s] each
        if self.query_positions is not None or bool(start.any()):
            return self.dense(num_keys)
        q_index = torch.arange(num_keys - s, num_keys, device=self.segments.device)  # [s]
        if bool(((sep >= num_keys) | (q_index == num_keys - 1)).all()):
            return None
        if bool((sep <= q_index + 1).all()):  # no key right of a query is in its Part A
            return causal_lower_right(s, num_keys)
        return self.dense(num_keys)

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """[b, 1, s, s_k] of 0 (may attend) and -inf: the float mask SDPA would otherwise make from the bool
        one at every call, i.e. in every layer. Every row sees itself, so no row is all -inf."""
        if dtype not in self._additive:
            additive = torch.zeros(self.dense().shape, dtype=dtype, device=self.segments.device)
            self._additive[dtype] = additive.masked_fill_(~self.dense(), float("-inf"))  # in place: one buffer
        return self._additive[dtype]

    def block_mask(self) -> BlockMask:
        """The FlexAttention BlockMask (128 x 128 tiles): the rule evaluated on the row's segments. On an
        accelerator create_block_mask is compiled (torchtitan's way), so the rule is evaluated tile by tile
        instead of through a dense [b, 1, s, s] tensor."""
        if self._block_mask is None:
            start, sep = self.segments[:, 0], self.segments[:, 1]  # [b, s] each
            positions = self.query_positions

            def mask_mod(b, h, q_index, kv_index):
                row_index = q_index if positions is None else positions[q_index]
                return visible(row_index, kv_index, start[b, q_index], sep[b, q_index])

            device = self.segments.device
            build = create_block_mask if device.type == "cpu" else _compiled_create_block_mask()
            self._block_mask = build(mask_mod, self.segments.shape[0], None, self.seq_length, self.num_keys,
                                     device=device)
        return self._block_mask
