"""The GLM model configuration: one dataclass, every GLM-130B switch a field."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from trainer.errors import ConfigError

POSITION_EMBEDDINGS = ("learned_2d", "rope_1d", "rope_2d")
NORMS = ("pre_ln", "deepnorm")
MLPS = ("gelu", "geglu")


SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_size", "vocab_size", "max_sequence_length",
              "position_embedding", "mlp", "norm")
"""What a checkpoint's tensors are tied to: a resume that changes one of them is refused, naming it."""


@dataclass
class ModelConfig:
    num_layers: int = 2
    """Number of transformer blocks N."""
    hidden_size: int = 64
    """Model width h."""
    num_attention_heads: int = 4
    """Attention heads; must divide hidden_size, and tensor-parallel size must divide it."""
    vocab_size: int = 0
    """True vocabulary size. 0 takes it from the tokenizer at start-up."""
    vocab_pad_multiple: int = 128
    """The embedding is padded to a multiple of vocab_pad_multiple * tp rows (Megatron's rule).
    Padded rows are zero and excluded from the softmax, so the loss does not depend on the padding."""
    max_sequence_length: int = 512
    """Largest position id + 1 (size of the learned position tables; RoPE has no table)."""
    ffn_hidden_size: Optional[int] = None
    """MLP inner width. None: 4h for GeLU, 8/3 h (rounded up to a multiple of 64) for GeGLU."""
    position_embedding: str = "learned_2d"
    """learned_2d (GLM: position + block-position tables), rope_1d (GLM-130B) or rope_2d
    (half the head dims rotated by position, half by block position)."""
    rope_base: float = 10000.0
    """RoPE base frequency."""
    norm: str = "pre_ln"
    """pre_ln (GLM) or deepnorm (GLM-130B post-LN: x = LN(alpha * x + f(x)), alpha = (2N)^1/2)."""
    mlp: str = "gelu"
    """gelu (h -> 4h -> h, tanh GeLU) or geglu (a * gelu(b), GLM-130B)."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2N) (pre_ln only)."""
    hidden_dropout: float = 0.1
    """Dropout on the embedding output and on each residual branch."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    embedding_shrink_alpha: float = 1.0
    """Embedding-gradient shrink: emb * a + emb.detach() * (1 - a). 1.0 is off; GLM-130B used 0.1."""
    fp32_softmax_layer_scaling: bool = False
    """GLM-130B's FP32 softmax with query-key layer scaling (q / (sqrt(d) * c), scores * c in fp32)."""
    compile: bool = False
    """Compile the model with torch.compile (same math, fused kernels; the first steps pay the compile time)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.mlp == "geglu":
            return 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        return 4 * self.hidden_size

    @property
    def deepnorm_alpha(self) -> float:
        return math.sqrt(2 * self.num_layers)

    @property
    def deepnorm_beta(self) -> float:
        return (2 * self.num_layers) ** -0.5

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """A config from recorded fields (an export's config.json, a checkpoint's run.json); fields this
        version does not know are ignored, missing ones take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def shape(self) -> dict:
        """The keys a checkpoint's weights are tied to (SHAPE_KEYS), as a checkpoint records them."""
        return {key: getattr(self, key) for key in SHAPE_KEYS}

    def shape_differences(self, recorded: dict) -> list[str]:
        """`model.key: checkpoint X, this run Y` for every SHAPE_KEYS value that differs from `recorded`."""
        return [f"model.{key}: checkpoint {recorded[key]!r}, this run {value!r}" for key, value in self.shape().items()
                if key in recorded and recorded[key] != value]

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rounded up to a multiple of vocab_pad_multiple * tp."""
        multiple = self.vocab_pad_multiple * tp
        return multiple * math.ceil(self.vocab_size / multiple)

    def num_parameters(self, tp: int = 1) -> int:
        """Closed-form parameter count of the whole model (tied output layer counted once)."""
        h, f, n = self.hidden_size, self.ffn_size, self.num_layers
        embedding = self.padded_vocab_size(tp) * h
        if self.position_embedding == "learned_2d":
            embedding += 2 * self.max_sequence_length * h
        attention = 3 * h * h + 3 * h + h * h + h
        ffn_in = 2 * f if self.mlp == "geglu" else f
        mlp = ffn_in * h + ffn_in + f * h + h
        norms = 2 * 2 * h
        return embedding + n * (attention + mlp + norms) + 2 * h

    def validate(self, tp: int = 1) -> None:
        """Raise ConfigError naming the problem and the fix."""
        positive = ("num_layers", "hidden_size", "num_attention_heads", "max_sequence_length",
                    "vocab_pad_multiple")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size must be >= 0 (0 = from the tokenizer), got {self.vocab_size}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size <= 0:
            raise ConfigError(f"model.ffn_hidden_size must be > 0 (or unset for the default), got {self.ffn_hidden_size}")
        for name in ("layernorm_epsilon", "init_std", "rope_base"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"model.{name} must be a finite number > 0, got {getattr(self, name)}")
        for name, allowed in (("position_embedding", POSITION_EMBEDDINGS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}: choose a head count that divides the width")
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by parallel.tp={tp}: "
                f"each tensor-parallel rank must hold whole heads; choose tp from the divisors of the head count")
        if self.position_embedding != "learned_2d" and self.head_dim % (4 if self.position_embedding == "rope_2d" else 2):
            raise ConfigError(f"model.position_embedding={self.position_embedding} needs a head dim divisible by "
                              f"{4 if self.position_embedding == 'rope_2d' else 2}, got {self.head_dim}")
        if self.ffn_size % tp:
            raise ConfigError(f"the MLP width {self.ffn_size} is not divisible by parallel.tp={tp}: "
                              f"set model.ffn_hidden_size to a multiple of tp")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.embedding_shrink_alpha <= 1.0:
            raise ConfigError(f"model.embedding_shrink_alpha must be in (0, 1], got {self.embedding_shrink_alpha}")
