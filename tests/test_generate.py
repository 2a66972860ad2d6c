"""glm-generate and its decoding (trainer/tools/decoding.py): the KV-cache path equals recomputing the whole
sequence (logits to 1e-5, same tokens), greedy and top-p, several blanks and [gMASK], and GLM-4's causal format; tp=2 generates what tp=1 does; the
CLI on an export; GLM-4's chat prompt is the training chat layout's context and the reply stops at a role token."""
import pytest
import torch

from tests.distributed import run_distributed
from trainer.checkpoint.export import write_export
from trainer.checkpoint.model_source import build_model
from trainer.data.tokenizer import train_tokenizer
from trainer.tools.decoding import (cached_step, causal_prompt, chat_prompt, continue_causal, encode_prompt, fill_blanks,
                              recompute_step)
from trainer.tools.generate import main
from trainer.model import GLMModel
from trainer.model.config import ModelConfig

TEXTS = ["the cat sat on the mat. the dog sat on the log.", "a bird in the hand is worth two in the bush."] * 20
VARIANTS = {"glm": {}, "glm130b": {"position_embedding": "rope_1d", "norm": "deepnorm", "mlp": "geglu"},
            "rope2d": {"position_embedding": "rope_2d", "fp32_softmax_layer_scaling": True},
            "glm4": {"position_embedding": "rope_1d", "rotary_fraction": 0.5, "rotary_pairing": "interleaved",
                     "normalization": "rmsnorm", "mlp": "swiglu", "num_key_value_heads": 2, "add_bias_linear": False,
                     "tie_word_embeddings": False}}


def chat_tokenizer():
    """The test tokenizer with GLM-4's role tokens added (special, after its vocabulary)."""
    from tokenizers import AddedToken

    from trainer.data.tokenizer import ROLE_TOKENS, GLMTokenizer

    backend = train_tokenizer(TEXTS, 300).backend
    backend.add_special_tokens([AddedToken(role, special=True, normalized=False) for role in ROLE_TOKENS])
    return GLMTokenizer(backend)


def _setup(variant="glm", tokenizer=None):
    torch.set_num_threads(1)
    tokenizer = tokenizer or train_tokenizer(TEXTS, 300)
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=tokenizer.vocab_size,
                         max_sequence_length=64, hidden_dropout=0.0, attention_dropout=0.0, **VARIANTS[variant])
    model = GLMModel(config, seed=5).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in weights:
            weights[name] = weights[name][:config.vocab_size]
    return tokenizer, config, model, weights


def test_prompt_encoding_marks_every_blank():
    tokenizer, *_ = _setup()
    part_a, masks = encode_prompt("the cat [MASK] on the [MASK].", tokenizer)
    assert part_a[0] == tokenizer.cls_id and [part_a[m] for m in masks] == [tokenizer.mask_id] * 2
    part_a, masks = encode_prompt("the cat sat", tokenizer)
    assert masks == [len(part_a) - 1] and part_a[-1] == tokenizer.gmask_id


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_logits_equal_recomputed_logits(variant):
    tokenizer, config, model, _ = _setup(variant)
    part_a, masks = encode_prompt("the cat [MASK] on the [MASK].", tokenizer)
    feeds = [(part_a, list(range(len(part_a))), [0] * len(part_a))]
    feeds += [([t], [masks[0]], [i + 1]) for i, t in enumerate([tokenizer.sop_id, 17, 40, 9])]
    feeds += [([t], [masks[1]], [i + 1]) for i, t in enumerate([tokenizer.sop_id, 3])]
    cached = cached_step(model, len(part_a), config.vocab_size)
    recomputed = recompute_step(model, len(part_a), config.vocab_size)
    with torch.no_grad():
        for ids, positions, blocks in feeds:
            torch.testing.assert_close(cached(ids, positions, blocks), recomputed(ids, positions, blocks),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_p", [0.0, 0.9])
def test_generation_with_and_without_cache_is_the_same(top_p):
    tokenizer, config, model, _ = _setup()
    for text in ("the cat [MASK] on the [MASK].", "a bird in the"):
        runs = [fill_blanks(model, tokenizer, text, config.max_sequence_length, config.vocab_size, max_new_tokens=6,
                            top_p=top_p, seed=3, use_cache=use_cache) for use_cache in (True, False)]
        assert runs[0] == runs[1]
        assert len(runs[0][1]) == max(text.count("[MASK]"), 1)  # one fill per blank; [gMASK] when none


def _generate_tp2(rank, world_size, out_path):
    import torch.distributed as dist

    tokenizer, config, _, weights = _setup()
    group = dist.new_group([0, 1])
    model = build_model(config, weights, group)
    result = fill_blanks(model, tokenizer, "the cat [MASK] on the [MASK].", config.max_sequence_length,
                         config.vocab_size, max_new_tokens=6, top_p=0.9, seed=3, tp_group=group)
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    assert gathered[0] == gathered[1]  # every tensor rank sampled the same tokens
    if rank == 0:
        torch.save(result, out_path)


def test_tp2_generates_what_tp1_generates(tmp_path):
    tokenizer, config, model, _ = _setup()
    expected = fill_blanks(model, tokenizer, "the cat [MASK] on the [MASK].", config.max_sequence_length,
                           config.vocab_size, max_new_tokens=6, top_p=0.9, seed=3)
    run_distributed(_generate_tp2, 2, tmp_path / "tp2.pt")
    assert torch.load(tmp_path / "tp2.pt") == expected


def test_cli_on_an_export(tmp_path, capsys):
    tokenizer, config, model, weights = _setup()
    tokenizer.save(tmp_path / "tokenizer.json")
    write_export(weights, config, tmp_path / "export", tmp_path / "tokenizer.json")
    assert main([str(tmp_path / "export"), "--text", "the cat [MASK] on the mat.", "--max-new-tokens", "4"]) == 0
    expected, _ = fill_blanks(model, tokenizer, "the cat [MASK] on the mat.", 64, config.vocab_size, max_new_tokens=4)
    assert capsys.readouterr().out.strip() == expected.strip()
    for bad in (["--top-p", "2"], ["--temperature", "nan"], ["--temperature", "inf"], ["--max-new-tokens", "0"]):
        assert main([str(tmp_path / "export"), "--text", "x", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, bad
    assert main([str(tmp_path / "nowhere"), "--text", "x"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere'} does not exist")


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_blank_that_never_ends_stops_inside_the_position_table(monkeypatch, use_cache):
    # --max-new-tokens beyond the model's positions: a fill that never samples [eop] stops at the last block
    # position the learned table holds (an IndexError in the embedding before).
    import trainer.tools.decoding

    tokenizer, config, model, _ = _setup()
    monkeypatch.setattr(trainer.tools.decoding, "sample", lambda *args: 7)
    _, spans = fill_blanks(model, tokenizer, "the cat [MASK] on the [MASK].", config.max_sequence_length,
                           config.vocab_size, max_new_tokens=1000, use_cache=use_cache)
    assert [len(span) for span in spans] == [config.max_sequence_length - 1] * 2


@pytest.mark.parametrize("top_p", [0.0, 0.9])
def test_causal_generation_with_and_without_cache_is_the_same_and_the_cli_prints_it(top_p, tmp_path, capsys):
    tokenizer, config, model, weights = _setup("glm4")
    prompt = causal_prompt("a bird in the", tokenizer)
    assert prompt[:2] == [tokenizer.gmask_id, tokenizer.sop_id]
    runs = [continue_causal(model, prompt, 64, config.vocab_size, 6, frozenset({tokenizer.eot_id}), top_p, seed=3,
                            use_cache=use_cache) for use_cache in (True, False)]
    assert runs[0] == runs[1] and 1 <= len(runs[0]) <= 6
    tokenizer.save(tmp_path / "tokenizer.json")
    write_export(weights, config, tmp_path / "export", tmp_path / "tokenizer.json")
    stops = frozenset({tokenizer.eot_id, tokenizer.eop_id})
    expected = continue_causal(model, prompt, 64, config.vocab_size, 6, stops, top_p, seed=3)
    assert main([str(tmp_path / "export"), "--causal", "--text", "a bird in the", "--max-new-tokens", "6",
                 "--top-p", str(top_p), "--seed", "3"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == "a bird in the" + tokenizer.decode(expected)


def test_chat_prompt_is_the_training_chat_layout_up_to_the_reply():
    from trainer.data.instruction import InstructionFormat

    tokenizer = chat_tokenizer()
    prompt, reply = "a bird in the hand", "is worth two"
    ids = chat_prompt(prompt, tokenizer)
    user, assistant = tokenizer.role_ids["<|user|>"], tokenizer.role_ids["<|assistant|>"]
    newline = tokenizer.encode("\n")
    assert ids == [tokenizer.gmask_id, tokenizer.sop_id, user, *newline, *tokenizer.encode(prompt), assistant, *newline]
    sample = InstructionFormat(tokenizer, 64, layout="chat")(tokenizer.encode(prompt), tokenizer.encode(reply))
    assert sample["input_ids"][:len(ids)].tolist() == ids
    first_counted = int(sample["loss_mask"].argmax())
    assert first_counted == len(ids) - 1  # the prompt's last position predicts the reply's first token
    # the positions generation feeds are the sample's: position 0, block positions 0, 1, 2, ...
    assert sample["position_ids"][:len(ids)].tolist() == [0] * len(ids)
    assert sample["block_position_ids"][:len(ids)].tolist() == list(range(len(ids)))


@pytest.mark.parametrize("stop", ["<|endoftext|>", "<|user|>", "<|observation|>"])
def test_chat_reply_stops_at_the_end_of_text_and_at_role_tokens_and_the_cli_prints_it(stop, monkeypatch, tmp_path,
                                                                                       capsys):
    import trainer.tools.decoding

    tokenizer = chat_tokenizer()
    _, config, model, weights = _setup("glm4", tokenizer)
    stop_id = tokenizer.eot_id if stop == "<|endoftext|>" else tokenizer.role_ids[stop]
    assert stop_id in tokenizer.stop_ids
    reply = iter([40, 41, stop_id, 42])
    monkeypatch.setattr(trainer.tools.decoding, "sample", lambda *args: next(reply))
    tokenizer.save(tmp_path / "tokenizer.json")
    write_export(weights, config, tmp_path / "export", tmp_path / "tokenizer.json")
    assert main([str(tmp_path / "export"), "--chat", "--text", "a bird in the", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tokenizer.decode([40, 41])  # the reply alone


def test_chat_cli_generates_what_the_decoding_does_and_refuses_a_tokenizer_without_roles(tmp_path, capsys):
    tokenizer = chat_tokenizer()
    _, config, model, weights = _setup("glm4", tokenizer)
    tokenizer.save(tmp_path / "tokenizer.json")
    write_export(weights, config, tmp_path / "export", tmp_path / "tokenizer.json")
    expected = continue_causal(model, chat_prompt("a bird in the", tokenizer), 64, config.vocab_size, 6,
                               frozenset(tokenizer.stop_ids))
    assert main([str(tmp_path / "export"), "--chat", "--text", "a bird in the", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tokenizer.decode(expected)
    with pytest.raises(SystemExit) as exit_status:  # argparse's error, as one line
        main([str(tmp_path / "export"), "--chat", "--causal", "--text", "x"])
    assert exit_status.value.code == 2 and "--causal: not allowed with argument --chat" in capsys.readouterr().err
    plain, config, _, weights = _setup("glm4")
    plain.save(tmp_path / "plain.json")
    write_export(weights, config, tmp_path / "plain", tmp_path / "plain.json")
    assert main([str(tmp_path / "plain"), "--chat", "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: GLM-4's chat layout needs a GLM-4-style tokenizer") and len(err.splitlines()) == 1
