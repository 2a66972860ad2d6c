"""One GLM transformer block: self-attention and MLP sublayers with pre-LN (GLM, ChatGLM2/3, GLM-4) or
DeepNorm (GLM-130B, ChatGLM-6B); LN is config.normalization (LayerNorm or RMSNorm, trainer/model/norm.py).

    pre_ln:    x = x + Attn(LN_in(x));              x = x + MLP(LN_post(x))
    deepnorm:  a = LN_in(x);  m = LN_post(alpha a + Attn(a));  x = alpha m + MLP(m),  alpha = (2N)^(1/2)
The DeepNorm form is GLM-130B's placement of the same post-LN update x <- LN(alpha x + f(x)): the LayerNorm
that closes a sublayer is the next block's input_layernorm (or the final LayerNorm), so the LayerNorm
count and names match the pre-LN model and GLM-130B's checkpoints. Written per sublayer it is ChatGLM-6B's
residual x <- alpha LN(x) + f(LN(x)) (its blocks compute exactly this, with the same LayerNorm names).
Dropout is applied to each sublayer output f(x) before the residual sum. MLP is the dense GLMMLP, or in the
blocks where config.is_moe_layer(i) the mixture of experts GLMMoE (trainer/model/moe.py), under the same name.

The block's math (`layer`) takes the micro-batch's RoPE tables and its mask in the attention kernel's form, both
built in `forward` from the caches shared by the blocks of a micro-batch; `compile_layer` compiles `layer` alone
(torchtitan's per-block torch.compile), so those Python caches stay outside the compiled region.

With sequence parallelism (trainer/parallel/sequence.py) the block holds this tensor rank's tokens [b, s/tp, h]
outside attention and the MLP: the norms, dropout (on the rank's own RNG stream) and residual adds run on them,
and the norms' gains and biases have their gradients summed over the tensor-parallel group.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from trainer.model.attention import AttentionMask, KVCache, SelfAttention
from trainer.model.config import ModelConfig
from trainer.model.embedding import Activations
from trainer.model.mask import GLMMask
from trainer.model.mlp import GLMMLP
from trainer.model.moe import GLMMoE
from trainer.model.norm import Norm
from trainer.model.rotary import Rotations, position_rotations_of
from trainer.parallel.sequence import region_rng, sum_grad_over_tp_


class GLMBlock(nn.Module):
    """Block `layer_number` (1-based): a pipeline piece mapping the activations tuple to a tuple (with a
    cp_group, of this rank's context-parallel chunks of each row: trainer/model/attention.py)."""

    def __init__(self, config: ModelConfig, layer_number: int, tp_group=None, seed: int = 0, ep_group=None,
                 sequence_parallel: bool = False, cp_group=None):
        super().__init__()
        self.deepnorm_alpha = config.deepnorm_alpha if config.norm == "deepnorm" else None
        self.input_layernorm = Norm(config)
        self.attention = SelfAttention(config, layer_number, tp_group, seed, sequence_parallel, cp_group)
        self.post_attention_layernorm = Norm(config)
        if config.is_moe_layer(layer_number - 1):
            self.mlp = GLMMoE(config, layer_number, tp_group, seed, ep_group, sequence_parallel)
        else:
            self.mlp = GLMMLP(config, layer_number, tp_group, seed, sequence_parallel)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.sequence_parallel = sequence_parallel
        if sequence_parallel:
            for norm in (self.input_layernorm, self.post_attention_layernorm):
                for param in norm.parameters():
                    sum_grad_over_tp_(param, tp_group)
        self._compiled_layer: Optional[Callable] = None  # compile_layer

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        with region_rng(self.sequence_parallel and self.training and self.dropout.p > 0):
            return self.dropout(x)

    def residual(self, hidden: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block around `attend` (normalised input [b, s, h] -> attention output [b, s, h]):
        pre-LN  x = x + Attn(LN(x)); x = x + MLP(LN(x)), or
        DeepNorm with GLM-130B's placement  a = LN_in(x); m = LN_post(alpha a + Attn(a)); x = alpha m + MLP(m)
        (the closing LayerNorm of the second sublayer is the next block's input_layernorm)."""
        if self.deepnorm_alpha is None:
            hidden = hidden + self._dropout(attend(self.input_layernorm(hidden)))
            return hidden + self._dropout(self.mlp(self.post_attention_layernorm(hidden)))
        alpha = self.deepnorm_alpha
        attention_input = self.input_layernorm(hidden)
        mlp_input = self.post_attention_layernorm(alpha * attention_input + self._dropout(attend(attention_input)))
        return alpha * mlp_input + self._dropout(self.mlp(mlp_input))

    def layer(self, hidden: torch.Tensor, rotations: Rotations, mask: AttentionMask,
              kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """The block's math: hidden [b, s, h], the RoPE tables, the mask in the kernel's form -> [b, s, h]."""
        return self.residual(hidden, lambda x: self.attention(x, rotations, mask, kv_cache=kv_cache))

    def compile_layer(self, **compile_kwargs) -> None:
        """torch.compile this block's math (`layer`); the mask and RoPE lookups of forward stay eager."""
        self._compiled_layer = torch.compile(self.layer, **compile_kwargs)

    def forward(self, inputs: Activations, kv_cache: Optional[KVCache] = None) -> Activations:
        """The block on the activations tuple. With a kv_cache (decoding) the tuple holds only the new
        positions, whose segments describe them; attention reads the cached keys and values of the earlier
        ones and appends the new ones. Items after the four (an MTP model's input_ids: trainer/model/mtp.py) pass
        through unchanged, so they ride past the blocks and the pipeline's stages to the MTP layer."""
        hidden, position_ids, block_position_ids, segments, *carried = inputs  # hidden [b, s, h]
        config = self.attention.config
        rotations = position_rotations_of(position_ids, block_position_ids, config)  # shared by the blocks
        mask = GLMMask.of(segments)  # shared by the blocks of a micro-batch (or of a decoding step)
        if kv_cache is None:
            layer = self._compiled_layer or self.layer
            hidden = layer(hidden, rotations, self.attention.kernel_mask(mask, hidden.dtype))
        else:  # decoding runs eagerly
            cached = 0 if kv_cache.key is None else kv_cache.key.shape[2]  # key [b, g, s_past, d]
            hidden = self.layer(hidden, rotations, self.attention.cached_mask(mask, cached + hidden.shape[1]), kv_cache)
        return (hidden, position_ids, block_position_ids, segments, *carried)


def compile_blocks(module: nn.Module, **compile_kwargs) -> int:
    """compile_layer on every GLMBlock under module (model.compile); -> how many."""
    blocks = [child for child in module.modules() if isinstance(child, GLMBlock)]
    for block in blocks:
        block.compile_layer(**compile_kwargs)
    return len(blocks)
