"""The GLM tokenizer: a byte-level BPE (HF `tokenizers`) that carries GLM's special tokens.

Byte-level BPE maps any text to ids and back exactly: decode(encode(text)) == text. The special
tokens are matched only when the trainer inserts them by id; a user's text that happens to contain
"[MASK]" is encoded as ordinary bytes, so documents never smuggle control tokens into a sample.

A GLM-4-style tokenizer.json (ChatGLM2/3, GLM-4) spells the piece delimiters `<sop>` / `<eop>` and has no
`[CLS]`: its `<sop>` and `<eop>` serve as the trainer's start and end of piece (ALIASES), so a pretrained
model keeps the ids it learned. Without `[CLS]` (cls_id None) the tokenizer serves the causal mode and
glm-generate --causal; blank infilling, whose Part A opens with it, refuses it (`add_special_tokens` appends
one). Its role tokens (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|observation|>`) are
read into `role_ids`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.errors import DataError
from trainer.paths import temporary_beside

# The start token opens Part A (the reference code's [CLS]); <|endoftext|> doubles as padding.
CLS, MASK, SMASK, GMASK = "[CLS]", "[MASK]", "[sMASK]", "[gMASK]"
SOP, EOP, EOT = "<|startofpiece|>", "<|endofpiece|>", "<|endoftext|>"
SPECIAL_TOKENS = (CLS, MASK, SMASK, GMASK, SOP, EOP, EOT)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""The 256 byte symbols of byte-level BPE plus the special tokens."""
ALIASES = {SOP: (SOP, "<sop>"), EOP: (EOP, "<eop>")}
"""Each special token's spellings, GLM's first: a tokenizer holding any of them has the token."""
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
"""GLM-4's chat roles."""


def special_token_id(tokenizer: Tokenizer, token: str) -> int | None:
    """The id of the special token under its first spelling the tokenizer has (ALIASES), or None."""
    for spelling in ALIASES.get(token, (token,)):
        if tokenizer.token_to_id(spelling) is not None:
            return tokenizer.token_to_id(spelling)
    return None


class GLMTokenizer:
    """A `tokenizers.Tokenizer` with GLM's special tokens ([CLS] optional); `vocab_size` counts them."""

    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if t != CLS and special_token_id(tokenizer, t) is None]
        if missing:
            raise DataError(f"the tokenizer lacks the GLM special token(s) {', '.join(missing)}: add them with "
                            f"`glm-prep --tokenizer FILE --add-special-tokens ...` or "
                            f"trainer.data.tokenizer.load_tokenizer(path, add_special_tokens=True)")
        tokenizer.encode_special_tokens = True
        self.backend = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = {t: special_token_id(tokenizer, t) for t in SPECIAL_TOKENS}
        self.cls_id, self.mask_id, self.smask_id, self.gmask_id = ids[CLS], ids[MASK], ids[SMASK], ids[GMASK]
        self.sop_id, self.eop_id, self.eot_id = ids[SOP], ids[EOP], ids[EOT]
        self.pad_id = self.eot_id
        self.role_ids = {role: tokenizer.token_to_id(role) for role in ROLE_TOKENS
                         if tokenizer.token_to_id(role) is not None}
        self.special_ids: frozenset[int] = (frozenset(i for i in ids.values() if i is not None)
                                            | frozenset(self.role_ids.values()))
        self.stop_ids: tuple[int, ...] = (self.eot_id, self.eop_id, *self.role_ids.values())
        """Where generated text ends: <|endoftext|>, <|endofpiece|> and every role token (each opens another
        turn; GLM-4's own generation config stops at <|user|> and <|observation|>)."""

    def require_cls(self, what: str) -> int:
        """cls_id, or a DataError naming `what` needs it (a GLM-4-style tokenizer has no [CLS])."""
        if self.cls_id is None:
            raise DataError(f"{what} opens Part A with {CLS}, which this tokenizer (GLM-4 style) lacks: use the "
                            f"causal mode / glm-generate --causal, or append it with glm-prep --add-special-tokens")
        return self.cls_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens written out (e.g. "[MASK]")."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_str(self) -> str:
        return self.backend.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (temp file in the same directory, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(path)
        try:
            self.backend.save(str(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def add_glm_special_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """Append whichever GLM special tokens `tokenizer` lacks under every spelling (new ids after its vocabulary)."""
    missing = [t for t in SPECIAL_TOKENS if special_token_id(tokenizer, t) is None]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> GLMTokenizer:
    """Train a byte-level BPE of `vocab_size` ids in total (256 bytes + merges + special tokens).

    The special tokens take ids 0..6 in SPECIAL_TOKENS order. A small text may stop the merges early,
    so the result's `vocab_size` can be below the request."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least "
                        f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return GLMTokenizer(tokenizer)


def load_tokenizer(path: str | os.PathLike, add_special_tokens: bool = False) -> GLMTokenizer:
    """Load a tokenizer.json; raise DataError if it is unreadable or lacks the GLM special tokens
    (unless `add_special_tokens`, which appends the missing ones)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist: pass the tokenizer.json written by glm-prep "
                        f"(PREFIX.tokenizer.json) or train one with glm-prep --vocab-size")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"tokenizer file {path} cannot be read ({error}): it must be a HF tokenizers "
                        f"tokenizer.json") from None
    if add_special_tokens:
        add_glm_special_tokens(tokenizer)
    return GLMTokenizer(tokenizer)
