"""The GLM model configuration: one dataclass, every GLM-130B switch a field."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

from trainer.errors import ConfigError

POSITION_EMBEDDINGS = ("learned_2d", "rope_1d", "rope_2d")
ROTARY_PAIRINGS = ("half", "interleaved")
NORMS = ("pre_ln", "deepnorm")
NORMALIZATIONS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "geglu", "swiglu")
GATED_MLPS = ("geglu", "swiglu")


SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "ffn_size",
              "vocab_size", "max_sequence_length", "position_embedding", "mlp", "norm", "normalization", "add_bias_linear",
              "add_qkv_bias", "tie_word_embeddings", "qk_norm", "moe_num_experts", "moe_ffn_size",
              "moe_shared_experts", "moe_first_dense_layers", "mtp_layers")
"""What a checkpoint's tensors are tied to: a resume that changes one of them is refused, naming it."""


class BlockParameters(NamedTuple):
    """A block's parameters by how the parallel axes place them (ModelConfig.block_parameters)."""

    split: int
    """Split over the tensor-parallel ranks."""
    replicated: int
    """Whole on every tensor-parallel rank."""
    experts: int = 0
    """The routed experts: split over tp (their ffn dim) and over ep (whole experts)."""

    @property
    def total(self) -> int:
        return self.split + self.replicated + self.experts

    def per_rank(self, tp: int, ep: int = 1) -> int:
        """Parameters one rank holds at tensor-parallel size tp and expert-parallel size ep."""
        return self.split // tp + self.replicated + self.experts // (tp * ep)


@dataclass
class ModelConfig:
    num_layers: int = 2
    """Number of transformer blocks N."""
    hidden_size: int = 64
    """Model width h."""
    num_attention_heads: int = 4
    """Attention heads; must divide hidden_size, and tensor-parallel size must divide it."""
    num_key_value_heads: Optional[int] = None
    """Key/value heads of grouped-query attention (each serves num_attention_heads / num_key_value_heads query
    heads); 1 is multi-query attention, None (or num_attention_heads) multi-head attention (ChatGLM2/3 and GLM-4:
    2). Tensor parallelism splits them when parallel.tp divides them and replicates them when tp is a multiple of
    them (each rank computes the one its query heads use; trainer/model/attention.py)."""
    kv_channels: Optional[int] = None
    """Dims d of each attention head (Megatron's kv_channels, transformers' head_dim). None: hidden_size /
    num_attention_heads. GLM-4.5 sets it: 96 heads of 128 dims at width 5120, so the queries are 12288 wide and
    the attention output projection maps 12288 -> 5120."""
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
    rotary_fraction: float = 1.0
    """The share of each head's dims that rope_1d rotates (the first rotary_fraction * head_dim; the rest pass
    through unrotated). ChatGLM2/3 and GLM-4: 0.5 (transformers' partial_rotary_factor)."""
    rotary_pairing: str = "half"
    """Which dims RoPE rotates together: half pairs (x_i, x_{i + r/2}) (GLM-130B, ChatGLM-6B), interleaved
    pairs (x_{2i}, x_{2i + 1}) (GPT-J; ChatGLM2/3, GLM-4 and transformers' glm); r = the rotated dims."""
    norm: str = "pre_ln"
    """pre_ln (GLM, ChatGLM2/3, GLM-4) or deepnorm (GLM-130B post-LN: x = LN(alpha * x + f(x)),
    alpha = (2N)^1/2; with GLM-130B's placement it is also ChatGLM-6B's x <- alpha LN(x) + f(LN(x)))."""
    normalization: str = "layernorm"
    """layernorm (with bias) or rmsnorm (x / sqrt(mean(x^2) + eps) * g, no bias; ChatGLM2/3, GLM-4)."""
    mlp: str = "gelu"
    """gelu (h -> 4h -> h, tanh GeLU), geglu (a * gelu(b), GLM-130B) or swiglu (silu(gate) * up, first half
    the gate as in ChatGLM2/3, GLM-4 and transformers' gate_up_proj)."""
    add_bias_linear: bool = True
    """Biases on the attention output projection and both MLP layers (ChatGLM2/3, GLM-4: none)."""
    add_qkv_bias: bool = True
    """Biases on the fused query/key/value projection (ChatGLM2/3, GLM-4 keep these)."""
    tie_word_embeddings: bool = True
    """The output layer is the word embedding (GLM, GLM-130B, ChatGLM-6B); False gives it its own
    vocabulary-parallel weight output_layer.weight (ChatGLM2/3, GLM-4)."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm / RMSNorm epsilon."""
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
    """Compile each transformer block's math with torch.compile, block by block (the mask and RoPE tables are built
    outside the compiled region); same math, fused kernels; the first steps pay the compile time."""
    qk_norm: bool = False
    """Per-head RMSNorm on the queries and keys before RoPE (GLM-4.5; transformers' use_qk_norm)."""
    moe_num_experts: int = 0
    """Routed experts E of each mixture-of-experts layer; 0 is a dense model (GLM-4.5: 160, GLM-4.5-Air: 128).
    The blocks after the first moe_first_dense_layers get the MoE MLP (trainer/model/moe.py); it needs
    model.mlp=swiglu and model.norm=pre_ln."""
    moe_top_k: int = 8
    """Experts each token is routed to (transformers' num_experts_per_tok; GLM-4.5: 8). Dropless: every token
    reaches its k experts."""
    moe_ffn_hidden_size: Optional[int] = None
    """SwiGLU width of each routed expert (transformers' moe_intermediate_size; GLM-4.5: 1536, Air: 1408). None:
    model.ffn_size."""
    moe_shared_experts: int = 0
    """Shared experts every token passes through, as one SwiGLU of moe_shared_experts * moe_ffn_hidden_size
    width (transformers' n_shared_experts; GLM-4.5: 1)."""
    moe_first_dense_layers: int = 0
    """The first this-many blocks keep the dense MLP of width model.ffn_hidden_size (transformers'
    first_k_dense_replace; GLM-4.5: 3, Air: 1)."""
    moe_routed_scaling: float = 1.0
    """The routed experts' weights are multiplied by this (transformers' routed_scaling_factor; GLM-4.5: 2.5)."""
    moe_norm_topk: bool = True
    """Normalise the chosen experts' sigmoid scores to sum 1 before the scaling (transformers' norm_topk_prob)."""
    moe_bias_update_rate: float = 0.001
    """Aux-loss-free balancing: after every optimizer step each expert's score-correction bias moves by this
    much toward under-loaded experts (+rate below the mean load, -rate above; 0 freezes the bias)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing auxiliary loss (0 in GLM-4.5, which balances by the bias alone)."""
    moe_z_loss_coeff: float = 0.0
    """Weight of the router z-loss, mean over tokens of logsumexp(router logits)^2 (0: off)."""
    mtp_layers: int = 0
    """Multi-token-prediction layers after the last block (transformers' num_nextn_predict_layers; GLM-4.5: 1):
    layer 1 predicts token t+2 from the last hidden state at t and the embedding of token t+1 (trainer/model/mtp.py;
    t+1 is the next slot of t's own sample). 0 or 1; runs on the last pipeline stage at parallel.pp > 1, and at any
    parallel.cp (shifted on whole rows before the split)."""
    mtp_loss_weight: float = 0.3
    """Weight of the MTP layers' mean loss added to the main loss (Megatron-Bridge: 0.3, slime: 0.2)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads if self.kv_channels is None else self.kv_channels

    @property
    def num_kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def qkv_rows(self) -> tuple[int, int, int]:
        """Rows of the q, k and v parts of the fused query_key_value weight."""
        kv = self.num_kv_heads * self.head_dim
        return self.num_attention_heads * self.head_dim, kv, kv

    def replicates_kv_heads(self, tp: int) -> bool:
        """Whether tensor-parallel size tp replicates the key/value heads (tp does not divide them, a multiple of
        them: each of the tp / g ranks sharing a head computes it) instead of splitting them."""
        return self.num_kv_heads % tp != 0

    @property
    def moe_ffn_size(self) -> int:
        """SwiGLU width of one routed expert."""
        return self.ffn_size if self.moe_ffn_hidden_size is None else self.moe_ffn_hidden_size

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether block layer_index (0-based) has a mixture-of-experts MLP instead of the dense one."""
        return self.moe_num_experts > 0 and layer_index >= self.moe_first_dense_layers

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rope_1d rotates."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def gated_mlp(self) -> bool:
        """The MLP's first layer outputs two halves, one gating the other (GeGLU, SwiGLU)."""
        return self.mlp in GATED_MLPS

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.gated_mlp:
            return 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        return 4 * self.hidden_size

    @property
    def ffn_in_rows(self) -> tuple[int, ...]:
        """Rows of the parts of the MLP's first weight dense_h_to_4h: the two halves of a gated MLP, (f, f), or
        (f,). Their sum is that layer's width (2f gated: the gated-MLP width)."""
        return (self.ffn_size,) * 2 if self.gated_mlp else (self.ffn_size,)

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
        """Vocabulary rounded up to a multiple of vocab_pad_multiple * tp: the rows of the vocabulary-parallel
        weights, whose split rule pads alike (trainer/parallel/split.py; tests/test_checkpoint_layout.py)."""
        multiple = self.vocab_pad_multiple * tp
        return multiple * math.ceil(self.vocab_size / multiple)

    def num_parameters(self, tp: int = 1, mtp: bool = True) -> int:
        """Closed-form parameter count of the whole model (a tied output layer counted once), the MTP layers
        included unless mtp=False (transformers' glm4_moe count leaves them out: it drops them on load)."""
        h = self.hidden_size
        vocabulary = self.padded_vocab_size(tp) * h
        embedding = vocabulary if self.tie_word_embeddings else 2 * vocabulary
        if self.position_embedding == "learned_2d":
            embedding += 2 * self.max_sequence_length * h
        blocks = sum(self.block_parameters(i).total for i in range(self.num_layers))
        extra = sum(self.mtp_layer_parameters(depth).total for depth in range(1, self.mtp_layers + 1)) if mtp else 0
        return embedding + blocks + self.norm_parameters + extra

    def active_parameters(self, tp: int = 1, mtp: bool = True) -> int:
        """The parameters one token passes through: num_parameters with each MoE block's routed experts counted
        moe_top_k of moe_num_experts (the embedding, attention, dense MLPs, routers, shared experts and norms
        whole). A dense model's active parameters are all of them."""
        unused = (self.moe_num_experts - self.moe_top_k) * self.expert_parameters() * self.num_moe_layers(mtp)
        return self.num_parameters(tp, mtp) - unused

    def num_moe_layers(self, mtp: bool = True) -> int:
        """Blocks with a mixture-of-experts MLP, the MTP layers' blocks included unless mtp=False (an MTP layer's
        block is block num_layers + depth - 1, 0-based: trainer/model/mtp.py)."""
        blocks = self.num_layers + (self.mtp_layers if mtp else 0)
        return sum(self.is_moe_layer(i) for i in range(blocks))

    @property
    def norm_parameters(self) -> int:
        """Parameters of one normalisation: gain and bias (LayerNorm) or gain (RMSNorm)."""
        return 2 * self.hidden_size if self.normalization == "layernorm" else self.hidden_size

    def expert_parameters(self) -> int:
        """Parameters of one routed expert: a SwiGLU of moe_ffn_size, no biases (gate and up [f, h], down [h, f])."""
        return 3 * self.moe_ffn_size * self.hidden_size

    def block_parameters(self, layer_index: int = 0) -> "BlockParameters":
        """Block layer_index's (0-based) parameters by placement: split over the tensor-parallel ranks (the
        column-parallel q/k/v and h -> ffn weights and biases, the row-parallel weights, the shared expert),
        replicated on each (the row-parallel biases, the two norms, the QK-norm gains, the router) and the routed
        experts (split over tp by their ffn dim and over ep by expert). The router's score-correction bias is a
        buffer, not a parameter."""
        h = self.hidden_size
        qkv, q = sum(self.qkv_rows), self.qkv_rows[0]
        split = qkv * h + (qkv if self.add_qkv_bias else 0) + q * h  # query_key_value and dense [h, n d]
        replicated = (h if self.add_bias_linear else 0) + 2 * self.norm_parameters
        replicated += 2 * self.head_dim if self.qk_norm else 0  # the QK-norm gains
        if not self.is_moe_layer(layer_index):
            ffn_in = sum(self.ffn_in_rows)
            split += ffn_in * h + self.ffn_size * h + (ffn_in if self.add_bias_linear else 0)
            replicated += h if self.add_bias_linear else 0
            return BlockParameters(split, replicated)
        split += self.moe_shared_experts * self.expert_parameters()
        replicated += self.moe_num_experts * h  # the router [E, h]
        return BlockParameters(split, replicated, self.moe_num_experts * self.expert_parameters())

    def mtp_layer_parameters(self, depth: int = 1) -> "BlockParameters":
        """MTP layer `depth` (1-based): enorm, hnorm and its final norm (replicated), eh_proj [h, 2h] (split) and
        its block, block num_layers + depth - 1 (0-based); its output head is the model's own (trainer/model/mtp.py)."""
        block = self.block_parameters(self.num_layers + depth - 1)
        h = self.hidden_size
        return block._replace(split=block.split + 2 * h * h, replicated=block.replicated + 3 * self.norm_parameters)

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
        for name, allowed in (("position_embedding", POSITION_EMBEDDINGS), ("norm", NORMS), ("mlp", MLPS),
                              ("normalization", NORMALIZATIONS), ("rotary_pairing", ROTARY_PAIRINGS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.kv_channels is not None and self.kv_channels <= 0:
            raise ConfigError(f"model.kv_channels must be > 0 (or unset: hidden_size / heads), got {self.kv_channels}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}: choose a head count that divides the width, "
                f"or set model.kv_channels (the head dim)")
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by parallel.tp={tp}: "
                f"each tensor-parallel rank must hold whole heads; choose tp from the divisors of the head count")
        self._validate_key_value_heads(tp)
        self._validate_rotary()
        if self.ffn_size % tp:
            raise ConfigError(f"the MLP width {self.ffn_size} is not divisible by parallel.tp={tp}: "
                              f"set model.ffn_hidden_size to a multiple of tp")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.embedding_shrink_alpha <= 1.0:
            raise ConfigError(f"model.embedding_shrink_alpha must be in (0, 1], got {self.embedding_shrink_alpha}")
        self._validate_moe(tp)

    def _validate_moe(self, tp: int = 1) -> None:
        for name in ("moe_num_experts", "moe_shared_experts", "moe_first_dense_layers", "mtp_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("moe_routed_scaling", "moe_bias_update_rate", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                     "mtp_loss_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"model.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.moe_num_experts and not 0 < self.moe_top_k <= self.moe_num_experts:
            raise ConfigError(f"model.moe_top_k={self.moe_top_k} must be in 1..model.moe_num_experts="
                              f"{self.moe_num_experts}")
        if self.moe_ffn_hidden_size is not None and self.moe_ffn_hidden_size <= 0:
            raise ConfigError(f"model.moe_ffn_hidden_size must be > 0 (or unset: model.ffn_size), "
                              f"got {self.moe_ffn_hidden_size}")
        if self.mtp_layers > 1:
            raise ConfigError(f"model.mtp_layers={self.mtp_layers}: one MTP layer (predicting token t+2) is "
                              f"implemented, as GLM-4.5 has; set it to 0 or 1")
        if self.mtp_layers and self.norm != "pre_ln":
            raise ConfigError("model.mtp_layers needs model.norm=pre_ln (the MTP layer is DeepSeek-V3's / GLM-4.5's "
                              "pre-norm block)")
        if self.moe_num_experts:
            self._validate_experts(tp)

    def _validate_experts(self, tp: int) -> None:
        if self.mlp != "swiglu" or self.norm != "pre_ln":
            raise ConfigError(f"model.moe_num_experts > 0 needs model.mlp=swiglu and model.norm=pre_ln (the experts "
                              f"are SwiGLU, as in GLM-4.5), got mlp={self.mlp}, norm={self.norm}")
        if self.moe_first_dense_layers >= self.num_layers:
            raise ConfigError(f"model.moe_first_dense_layers={self.moe_first_dense_layers} leaves no mixture-of-"
                              f"experts block among model.num_layers={self.num_layers}: lower it or set "
                              f"model.moe_num_experts=0")
        if self.moe_ffn_size % tp:
            raise ConfigError(f"the expert width {self.moe_ffn_size} is not divisible by parallel.tp={tp}: set "
                              f"model.moe_ffn_hidden_size to a multiple of tp")

    def _validate_key_value_heads(self, tp: int) -> None:
        kv, n = self.num_kv_heads, self.num_attention_heads
        if kv <= 0 or n % kv:
            raise ConfigError(f"model.num_key_value_heads={kv} must be > 0 and divide model.num_attention_heads={n} "
                              f"(each key/value head serves the same number of query heads)")
        if kv % tp and tp % kv:
            raise ConfigError(f"model.num_key_value_heads={kv} and parallel.tp={tp}: tp must divide the key/value "
                              f"heads (each rank holds whole ones) or be a multiple of them (each rank computes the "
                              f"one its query heads use); choose tp among the divisors and the multiples of {kv}")
        if self.replicates_kv_heads(tp) and (kv * self.head_dim) % tp:
            raise ConfigError(f"parallel.tp={tp} replicates the {kv} key/value head(s), whose {kv * self.head_dim} "
                              f"weight rows each rank stores 1/tp of: choose a tp that divides {kv * self.head_dim}")

    def _validate_rotary(self) -> None:
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ConfigError(f"model.rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
        if self.position_embedding == "learned_2d":
            return
        if self.position_embedding == "rope_2d" and self.rotary_fraction != 1.0:
            raise ConfigError("model.rotary_fraction < 1 needs model.position_embedding=rope_1d: rope_2d rotates "
                              "each half of a head by one of the two position ids")
        if self.position_embedding == "rope_2d" and self.head_dim % 4:
            raise ConfigError(f"model.position_embedding=rope_2d needs a head dim divisible by 4, got {self.head_dim}")
        if self.position_embedding == "rope_1d" and (self.rotary_dim == 0 or self.rotary_dim % 2):
            raise ConfigError(f"model.position_embedding=rope_1d rotates pairs of dims: head dim {self.head_dim} * "
                              f"model.rotary_fraction={self.rotary_fraction} gives {self.rotary_dim} rotated dims; "
                              f"choose a fraction that gives an even, non-zero number")
