"""The peak resident set of one long prompt on a glm-debug-sized model (docs/EVALUATION.md, long contexts).

    python examples/long_prompt_memory.py 32768 causal|blank|harness

A model of configs/glm-debug.yaml's shapes (random weights, vocabulary 50304, model.max_sequence_length N + 8), one
thread, then one of:
    causal   a prompt of N random tokens continued by 2 (glm-generate --causal: continue_causal)
    blank    a Part A of N tokens prefilled, the next token's logits read (glm-generate's first blank-filling step)
    harness  one causal loglikelihood request of N - 3 context and 3 continuation tokens (glm-eval --harness)
Prints the peak resident set (ru_maxrss: the whole process, the model included) and the model's share of it.
"""
import argparse
import resource
import time
from types import SimpleNamespace

import torch

from trainer.config import load_config
from trainer.model.glm import GLMModel
from trainer.tools.decoding import cached_step, continue_causal
from trainer.tools.harness.scoring import causal_sample, score_samples

VOCAB = 50304


def run(model: GLMModel, positions: int, prompt: list[int], kind: str) -> object:
    """The prompt through the tool path `kind` (a model of `positions` positions) -> what it returns (tokens, a token
    id, or scores)."""
    if kind == "causal":
        return continue_causal(model, prompt, positions, VOCAB, max_new_tokens=2)
    if kind == "blank":
        n = len(prompt)
        return int(cached_step(model, n, VOCAB)(prompt, list(range(n)), [0] * n).argmax())
    special = SimpleNamespace(gmask_id=1, sop_id=2)  # the request's two leading ids; their values do not matter here
    return score_samples(model, [causal_sample(prompt[:-3], prompt[-3:], special, positions)], 0,
                         VOCAB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("length", type=int, help="prompt tokens")
    parser.add_argument("kind", choices=["causal", "blank", "harness"])
    args = parser.parse_args()
    config = load_config("configs/glm-debug.yaml", [f"model.max_sequence_length={args.length + 8}",
                                                    f"model.vocab_size={VOCAB}"]).model
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GLMModel(config).eval()
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    prompt = torch.randint(10, VOCAB - 304, (args.length,)).tolist()
    start = time.time()
    result = run(model, config.max_sequence_length, prompt, args.kind)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{args.kind} {args.length}: peak RSS {peak / 2 ** 20:.2f} GiB (the model built: {built / 2 ** 20:.2f} GiB), "
          f"{time.time() - start:.1f} s -> {result}")


if __name__ == "__main__":
    main()
