"""The GLM tokenizer: special tokens, exact round trip, save/load, and tokenizers without GLM's tokens."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.data.corpus import embedded_documents
from trainer.data.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from trainer.errors import DataError

TEXT = "Blank infilling: Part A attends both ways; Part B is generated left to right.\n" * 30
TRICKY = "caf\u00e9 \u6587\u672c\u3002 emoji \U0001F600\r\n\ttabs  and a literal [MASK] or <|endoftext|> in user text"


def test_special_tokens_have_distinct_ids_and_padding_is_end_of_text():
    tokenizer = train_tokenizer(embedded_documents()[:10], 512)
    ids = [tokenizer.cls_id, tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id,
           tokenizer.sop_id, tokenizer.eop_id, tokenizer.eot_id]
    assert ids == list(range(len(SPECIAL_TOKENS))) and tokenizer.pad_id == tokenizer.eot_id
    assert tokenizer.vocab_size == 512
    assert tokenizer.decode(ids) == "".join(SPECIAL_TOKENS)


def test_round_trip_is_exact_and_user_text_never_becomes_a_special_token():
    tokenizer = train_tokenizer([TEXT], 400)
    for text in (TEXT, TRICKY, ""):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert not set(ids) & tokenizer.special_ids


def test_save_and_load_give_the_same_ids(tmp_path):
    tokenizer = train_tokenizer([TEXT], 400)
    tokenizer.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert loaded.encode(TRICKY) == tokenizer.encode(TRICKY)
    assert (loaded.vocab_size, loaded.mask_id, loaded.eop_id) == (tokenizer.vocab_size, tokenizer.mask_id,
                                                                  tokenizer.eop_id)
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temporary left behind


def plain_bpe(path) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["[MASK]"],
                                                              show_progress=False))
    tokenizer.save(str(path))


def test_tokenizer_without_special_tokens_is_refused_or_completed(tmp_path):
    path = tmp_path / "plain.json"
    plain_bpe(path)
    with pytest.raises(DataError, match=r"lacks the GLM special token\(s\) \[sMASK\], \[gMASK\].*--add-special-tokens"):
        load_tokenizer(path)
    completed = load_tokenizer(path, add_special_tokens=True)
    before = Tokenizer.from_file(str(path))
    assert completed.mask_id == before.token_to_id("[MASK]")
    assert completed.vocab_size == before.get_vocab_size() + len(SPECIAL_TOKENS) - 1
    assert completed.decode(completed.encode(TEXT)) == TEXT


def test_unusable_tokenizer_files_and_sizes(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot be read"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(DataError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer([TEXT], 100)


GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>"]
"""GLM-4's special tokens, in its order (no [CLS]; the piece delimiters spelled <sop> / <eop>)."""


def test_glm4_style_tokenizer_maps_onto_the_special_ids(tmp_path):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=GLM4_SPECIALS,
                                                              show_progress=False))
    tokenizer.save(str(tmp_path / "glm4.json"))
    glm4 = load_tokenizer(tmp_path / "glm4.json")
    ids = {name: tokenizer.token_to_id(name) for name in GLM4_SPECIALS}
    assert (glm4.eot_id, glm4.mask_id, glm4.gmask_id, glm4.smask_id) == tuple(ids[t] for t in GLM4_SPECIALS[:4])
    assert (glm4.sop_id, glm4.eop_id, glm4.pad_id) == (ids["<sop>"], ids["<eop>"], ids["<|endoftext|>"])
    assert glm4.role_ids == {role: ids[role] for role in GLM4_SPECIALS[6:]}
    assert glm4.cls_id is None and glm4.vocab_size == tokenizer.get_vocab_size()
    with pytest.raises(DataError, match="lacks: use the causal mode"):
        glm4.require_cls("blank infilling")
    completed = load_tokenizer(tmp_path / "glm4.json", add_special_tokens=True)
    assert completed.cls_id == tokenizer.get_vocab_size() and completed.sop_id == ids["<sop>"]
