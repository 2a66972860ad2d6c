"""Model FLOPs per token (trainer/engine/flops.py) against hand counts: GLM-Base (multi-head, GeLU) keeps
Megatron's formula, GLM-4-9B's grouped-query attention counts its K and V projections at 2 key/value heads."""
from trainer.config import load_config
from trainer.engine.flops import FLOP_FORMULA, forward_flops_per_token, train_flops_per_token
from trainer.model.config import ModelConfig


def test_glm_base_is_megatrons_formula():
    model = load_config("configs/glm-base.yaml").model
    h, s, v_pad = 768, 512, 30592  # 30592 = 239 * 128: no padding at tp = 1
    assert (model.hidden_size, model.num_layers, model.padded_vocab_size(1)) == (h, 12, v_pad)
    assert train_flops_per_token(model, s) == 3 * (12 * (8 * h * h + 16 * h * h + 4 * s * h) + 2 * h * v_pad)


def test_glm_4_9b_counts_two_key_value_heads():
    model = load_config("configs/glm-4-9b.yaml").model
    # by hand, per layer at s = 8192 (h 4096, 32 query heads of 128 dims, 2 key/value heads, SwiGLU 13696):
    q_and_output = 2 * 4096 * 4096 * 2         # 67,108,864
    k_and_v = 2 * 4096 * (2 * 2 * 128)         # 4,194,304 (multi-head attention would count 67,108,864)
    mlp = 2 * 4096 * 13696 * 3                 # 336,592,896
    scores_and_values = 4 * 8192 * 4096        # 134,217,728
    output_layer = 2 * 4096 * 151552           # 1,241,513,984 (151552 = 1184 * 128)
    forward = 40 * (q_and_output + k_and_v + mlp + scores_and_values) + output_layer
    assert forward == 22_926_065_664
    assert forward_flops_per_token(model, 8192) == forward
    assert train_flops_per_token(model, 8192) == 3 * forward
    assert "4 h g d" in FLOP_FORMULA


def test_the_vocabulary_padding_of_tp_is_counted():
    model = load_config("configs/glm-4-9b.yaml").model
    # 151552 rows pad to a multiple of 128 * 3 = 384: 151680
    assert forward_flops_per_token(model, 8192, tp=3) - forward_flops_per_token(model, 8192) == 2 * 4096 * 128


def test_causal_convention_counts_half_the_attention_square():
    # Megatron-LM's current convention: the s x s score square of a causal mask counted half (2 s h, not 4 s h)
    model = ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, vocab_size=50304)
    s, layers, h = 2048, 24, 2048
    full, causal = train_flops_per_token(model, s), train_flops_per_token(model, s, attention="causal")
    assert full - causal == 3 * layers * 2 * s * h
    assert forward_flops_per_token(model, s, attention="full") == forward_flops_per_token(model, s)
