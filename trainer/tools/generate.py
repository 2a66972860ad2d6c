"""glm-generate: fill every [MASK] of a text, or continue it after [gMASK], with GLM's blank infilling; continue
it left to right in GLM-4's format (--causal); or reply to it as one user turn of GLM-4's chat (--chat). The
decoding itself is trainer/tools/decoding.py.

    glm-generate SOURCE --text "The capital of France is [MASK]." [--top-p 0.9 --seed 0] [--max-new-tokens 32]
    glm-generate SOURCE --causal --text "Once upon a time"
    glm-generate SOURCE --chat --text "What is the capital of France?"

Each blank is filled in text order as a Part B span until [eop] or --max-new-tokens; with --causal the text
follows [gMASK] <sop> and is continued until <|endoftext|>; with --chat the prompt is
[gMASK] <sop> <|user|> \\n text <|assistant|> \\n (the chat layout of data.instruction_format chat) and the reply,
printed alone, runs until <|endoftext|> or a role token. Under tensor parallelism (glm-generate run with
WORLD_SIZE = tp ranks) every rank samples the same token from the same seeded generator. SOURCE is anything
glm-ckpt reads (docs/CHECKPOINTS.md).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional

from trainer.errors import ConfigError, OneLineParser, exits_on_error
from trainer.tools.source_args import add_source_arguments, load_source_model

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog="glm-generate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--text", required=True, help="the prompt, with [MASK] / [sMASK] / [gMASK] markers")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--causal", action="store_true",
                        help="GLM-4's format: [gMASK]<sop> + the text, continued left to right")
    layout.add_argument("--chat", action="store_true",
                        help="GLM-4's chat: the text is the user's turn; prints the assistant's reply")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest fill of one blank")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0 = greedy)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature when sampling")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the same on every rank)")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every token")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


MIN_TEMPERATURE = 1e-4
"""Below this, logits / temperature overflows float32 for ordinary logits; sampling that cold is greedy anyway."""
MIN_TOP_P = 1e-6
"""Below this, top_p rounds to 0 in float32 and the nucleus is empty; a nucleus that small is greedy anyway."""


def check_sampling(args: argparse.Namespace) -> None:
    """The decoding flags in the ranges sampling can use; the text encodable as UTF-8."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (0 <= args.top_p <= 1 and (args.top_p == 0 or args.top_p >= MIN_TOP_P)):
        raise ConfigError(f"--top-p must be 0 (greedy) or in [{MIN_TOP_P}, 1], got {args.top_p}")
    if not (math.isfinite(args.temperature) and args.temperature >= MIN_TEMPERATURE):
        raise ConfigError(f"--temperature must be a finite number >= {MIN_TEMPERATURE} (for greedy decoding use "
                          f"--top-p 0), got {args.temperature}")
    if not 0 <= args.seed < 2 ** 63:
        raise ConfigError(f"--seed must be in [0, 2**63), got {args.seed}")
    try:
        args.text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConfigError(f"--text is not UTF-8 text (byte {ord(error.object[error.start]) - 0xDC00:#x} at "
                          f"{error.start}): give the prompt in UTF-8") from None


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    check_sampling(args)
    from trainer.tools.decoding import causal_prompt, chat_prompt, continue_causal, fill_blanks  # torch, DeepSpeed

    model, config, tokenizer, tp_group = load_source_model(args)
    if args.causal or args.chat:
        prompt = (chat_prompt if args.chat else causal_prompt)(args.text, tokenizer)
        generated = continue_causal(model, prompt, config.max_sequence_length, config.vocab_size, args.max_new_tokens,
                                    frozenset(tokenizer.stop_ids), args.top_p, args.temperature, args.seed,
                                    use_cache=not args.no_kv_cache, tp_group=tp_group)
        text = tokenizer.decode(generated) if args.chat else args.text + tokenizer.decode(generated)
    else:
        text, _ = fill_blanks(model, tokenizer, args.text, config.max_sequence_length, config.vocab_size,
                              args.max_new_tokens, args.top_p, args.temperature, args.seed,
                              use_cache=not args.no_kv_cache, tp_group=tp_group)
    if int(os.environ.get("RANK", "0")) == 0:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
