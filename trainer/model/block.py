"""One GLM transformer block: self-attention and MLP sublayers with pre-LN (GLM, ChatGLM2/3, GLM-4) or
DeepNorm (GLM-130B, ChatGLM-6B); LN is config.normalization (LayerNorm or RMSNorm, trainer/model/norm.py).

    pre_ln:    x = x + Attn(LN_in(x));              x = x + MLP(LN_post(x))
    deepnorm:  a = LN_in(x);  m = LN_post(alpha a + Attn(a));  x = alpha m + MLP(m),  alpha = (2N)^(1/2)
The DeepNorm form is GLM-130B's placement of the same post-LN update x <- LN(alpha x + f(x)): the LayerNorm
that closes a sublayer is the next block's input_layernorm (or the final LayerNorm), so the LayerNorm
count and names match the pre-LN model and GLM-130B's checkpoints. Written per sublayer it is ChatGLM-6B's
residual x <- alpha LN(x) + f(LN(x)) (its blocks compute exactly this, with the same LayerNorm names).
Dropout is applied to each sublayer output f(x) before the residual sum.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from trainer.model.attention import KVCache, SelfAttention
from trainer.model.config import ModelConfig
from trainer.model.embedding import Activations
from trainer.model.mask import GLMMask
from trainer.model.mlp import GLMMLP
from trainer.model.norm import Norm


class GLMBlock(nn.Module):
    """Block `layer_number` (1-based): a pipeline piece mapping the activations tuple to a tuple (with a
    cp_group, of this rank's context-parallel chunks of each row: trainer/model/attention.py)."""

    def __init__(self, config: ModelConfig, layer_number: int, tp_group=None, seed: int = 0, cp_group=None):
        super().__init__()
        self.deepnorm_alpha = config.deepnorm_alpha if config.norm == "deepnorm" else None
        self.input_layernorm = Norm(config)
        self.attention = SelfAttention(config, layer_number, tp_group, seed, cp_group)
        self.post_attention_layernorm = Norm(config)
        self.mlp = GLMMLP(config, layer_number, tp_group, seed)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def residual(self, hidden: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block around `attend` (normalised input [b, s, h] -> attention output [b, s, h]):
        pre-LN  x = x + Attn(LN(x)); x = x + MLP(LN(x)), or
        DeepNorm with GLM-130B's placement  a = LN_in(x); m = LN_post(alpha a + Attn(a)); x = alpha m + MLP(m)
        (the closing LayerNorm of the second sublayer is the next block's input_layernorm)."""
        if self.deepnorm_alpha is None:
            hidden = hidden + self.dropout(attend(self.input_layernorm(hidden)))
            return hidden + self.dropout(self.mlp(self.post_attention_layernorm(hidden)))
        alpha = self.deepnorm_alpha
        attention_input = self.input_layernorm(hidden)
        mlp_input = self.post_attention_layernorm(alpha * attention_input + self.dropout(attend(attention_input)))
        return alpha * mlp_input + self.dropout(self.mlp(mlp_input))

    def forward(self, inputs: Activations, kv_cache: Optional[KVCache] = None) -> Activations:
        """The block on the activations tuple. With a kv_cache (decoding) the tuple holds only the new
        positions, whose segments describe them; attention reads the cached keys and values of the earlier
        ones and appends the new ones."""
        hidden, position_ids, block_position_ids, segments = inputs  # hidden [b, s, h]
        mask = GLMMask.of(segments)  # shared by the blocks of a micro-batch (or of a decoding step)
        if kv_cache is not None:
            cached = 0 if kv_cache.key is None else kv_cache.key.shape[2]  # key [b, g, s_past, d]
            mask = mask.dense(num_keys=cached + hidden.shape[1])  # [b, 1, s, s_past + s]
        hidden = self.residual(hidden, lambda x: self.attention(x, position_ids, block_position_ids, mask,
                                                                 kv_cache=kv_cache))
        return hidden, position_ids, block_position_ids, segments
