"""Long prompts in generation and evaluation (trainer/tools/decoding.py, evaluate.py; GLMMask.cached): the mask
forms of a KV-cached step attend as the dense mask does and a prefill takes no dense form; a 4096-token prompt on
a tiny model generates with the KV cache what the recompute path (the training forward's additive mask) generates,
as a causal continuation and as a blank filled after a 4096-token Part A; a long cloze text scores as the chained
token-by-token log-likelihood."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from tests.test_evaluate import _chained_log_likelihood
from tests.test_generate import TEXTS, VARIANTS
from trainer.data.tokenizer import train_tokenizer
from trainer.model import GLMModel
from trainer.model.config import ModelConfig
from trainer.model.mask import GLMMask, segments_of_sep
from trainer.tools.decoding import continue_causal, fill_blanks
from trainer.tools.evaluate import score_labels

LONG = 4096


@pytest.mark.parametrize("sep, new, past", [
    (10, 10, 0),  # a blank-infilling prefill: Part A only
    (1, 10, 0),  # a causal prefill ([gMASK], then Part B)
    (0, 10, 0),
    (10, 4, 10),  # Part B after a cached Part A (cloze scoring)
    (10, 1, 12),  # one decoding step
    (6, 10, 0),  # Part A and Part B in one step (the recompute path)
    (12, 4, 10),  # Part A running on into the new positions
])
def test_a_cached_steps_mask_form_attends_as_the_dense_mask(sep, new, past):
    """SDPA under the form GLMMask.cached gives equals SDPA under the dense rows of the mask (grouped-query heads)."""
    num_keys = past + new
    mask = GLMMask(segments_of_sep(torch.tensor([sep, sep]), new))
    form = mask.cached(num_keys)
    generator = torch.Generator().manual_seed(sep + new + past)
    q = torch.randn(2, 4, new, 8, generator=generator)
    k, v = (torch.randn(2, 2, num_keys, 8, generator=generator) for _ in range(2))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(num_keys), enable_gqa=True)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=form, enable_gqa=True), expected)
    if past == 0 and (sep >= new or sep <= 1):
        assert form is None or isinstance(form, CausalBias)  # a prefill never builds [s, s]


def _tiny(variant: str):
    torch.set_num_threads(1)
    tokenizer = train_tokenizer(TEXTS, 300)
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=tokenizer.vocab_size,
                         max_sequence_length=LONG + 16, hidden_dropout=0.0, attention_dropout=0.0, **VARIANTS[variant])
    return tokenizer, config, GLMModel(config, seed=5).eval()


def _long_text(tokenizer, tokens: int) -> str:
    """Text of `tokens` to `tokens` + 30 tokens, the test corpus repeated."""
    text, words = "", " ".join(TEXTS).split()
    while len(tokenizer.encode(text)) < tokens:
        text += " ".join(words[:10]) + " "
        words = words[10:] + words[:10]
    return text


@pytest.mark.parametrize("variant", ["glm4", "glm"])
def test_a_long_causal_prompt_generates_what_the_recompute_path_does(variant):
    tokenizer, config, model = _tiny(variant)
    prompt = torch.randint(10, config.vocab_size, (LONG,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = [continue_causal(model, prompt, config.max_sequence_length, config.vocab_size, max_new_tokens=4, top_p=0.9,
                            seed=3, use_cache=use_cache) for use_cache in (True, False)]
    assert runs[0] == runs[1] and len(runs[0]) == 4


def test_a_blank_after_a_long_part_a_is_filled_as_the_recompute_path_fills_it():
    tokenizer, config, model = _tiny("glm")
    text = _long_text(tokenizer, LONG - 40) + " the cat [MASK] on the mat."
    runs = [fill_blanks(model, tokenizer, text, config.max_sequence_length, config.vocab_size, max_new_tokens=4,
                        top_p=0.9, seed=3, use_cache=use_cache) for use_cache in (True, False)]
    assert runs[0][1] == runs[1][1] and len(runs[0][1][0]) > 0
    assert len(tokenizer.encode(text)) > LONG - 40


def test_a_long_cloze_text_scores_its_chained_log_likelihood():
    tokenizer, config, model = _tiny("glm")
    text = _long_text(tokenizer, LONG - 40) + " the [MASK] sat on the mat."
    words = {"animal": tokenizer.encode(" cat"), "place": tokenizer.encode(" the bush")}
    scores = score_labels(model, tokenizer, text, words, config.vocab_size, max_sequence_length=config.max_sequence_length)
    expected = {label: _chained_log_likelihood(model, tokenizer, text, word, config.vocab_size)
                for label, word in words.items()}
    torch.testing.assert_close(torch.tensor(list(scores.values())), torch.tensor(list(expected.values())),
                               rtol=1e-5, atol=1e-5)
