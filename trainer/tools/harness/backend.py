"""An lm-evaluation-harness model backend on a GLMModel: any source glm-eval reads, at any tensor-parallel size,
or the live model of a training run (trainer/tools/harness/in_loop.py).

    lm = GLMHarnessLM.from_source("runs/glm-4-debug")              # or GLMHarnessLM(model, tokenizer, config)
    lm_eval.simple_evaluate(model=lm, tasks=["glm_lastword"], task_manager=task_manager(None))

- loglikelihood: the continuation scored in the model's layout (trainer/tools/harness/scoring.py): `causal` left to
  right after [gMASK] <sop>, or `blank`, GLM's cloze method (the context bidirectional as Part A, the continuation
  as Part B). The default is `causal` for a model of GLM-4's architecture (one transformers' glm can express)
  and `blank` otherwise (GLM, GLM-130B, ChatGLM-6B); `layout=` chooses.
- loglikelihood_rolling: the text in disjoint windows (lm-eval's own rolling windows, one token of context
  between windows), each scored as a continuation; in the blank layout behind [gMASK] (GLM's language modelling).
- generate_until: greedy (or, with do_sample, seeded top-p) decoding by trainer/tools/decoding.py, causal after
  [gMASK] <sop> or as the fill of a [gMASK] blank, cut at the first `until` string.

Requests are batched by length (longest first; the same batches for the same requests, so the same numbers),
with a progress bar on rank 0's terminal. Under tensor parallelism every rank runs every request (lm-eval sees one
process) and the vocabulary-parallel logits are gathered, so every rank returns the same results.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from trainer.tools.decoding import continue_causal, fill_blanks
from trainer.errors import ConfigError
from trainer.tools.harness.scoring import LAYOUTS, lay_out, score_samples
from trainer.model.config import ModelConfig

MASK_TOKENS = ("[MASK]", "[gMASK]")


def default_layout(config: ModelConfig) -> str:
    """`causal` for GLM-4's architecture (pre-RMSNorm, SwiGLU, interleaved rope_1d: trained left to right),
    `blank` for every other GLM."""
    from trainer.checkpoint.hf import hf_unsupported

    return "blank" if hf_unsupported(config) else "causal"


@register_model("glm-trainer")
class GLMHarnessLM(LM):
    """lm-eval's LM interface on this trainer's GLMModel (a tensor-parallel shard under a launcher)."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: ModelConfig, tp_group=None,
                 layout: Optional[str] = None, mask_token: str = "[MASK]", batch_size: int = 16,
                 progress: Optional[bool] = None):
        super().__init__()
        layout = layout or default_layout(config)
        if layout not in LAYOUTS:
            raise ConfigError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
        if mask_token not in MASK_TOKENS:
            raise ConfigError(f"mask_token={mask_token!r} is not one of {', '.join(MASK_TOKENS)}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if layout == "blank":
            tokenizer.require_cls("GLM's cloze scoring (layout=blank)")
        self.model, self.tokenizer, self.config, self.tp_group = model, tokenizer, config, tp_group
        self.layout, self.batch_size = layout, int(batch_size)
        self.mask_id = tokenizer.mask_id if mask_token == "[MASK]" else tokenizer.gmask_id
        on_terminal = sys.stderr.isatty() and int(os.environ.get("RANK", "0")) == 0  # one bar, on rank 0
        self.progress = on_terminal if progress is None else progress

    @classmethod
    def from_source(cls, source: str | Path, tokenizer: Optional[str | Path] = None, **options) -> "GLMHarnessLM":
        """The backend on anything glm-eval reads (a run directory, its checkpoints/, a global_stepN, an export,
        a transformers directory)."""
        import argparse

        args = argparse.Namespace(source=Path(source), tokenizer=None if tokenizer is None else Path(tokenizer),
                                  config=None, overrides=[])
        return cls.from_args(args, **options)

    @classmethod
    def from_args(cls, args, **options) -> "GLMHarnessLM":
        """The backend on the model of the offline tools' source arguments (trainer/tools/source_args.py), on this
        rank's accelerator (the CPU without one); under a launcher (WORLD_SIZE = tp ranks) each rank holds its
        shard."""
        from trainer.engine.distributed import local_device
        from trainer.tools.source_args import load_source_model

        model, config, tokenizer, tp_group = load_source_model(args)
        return cls(model.to(local_device()), tokenizer, config, tp_group, **options)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "GLMHarnessLM":
        """`lm_eval --model glm-trainer --model_args source=DIR,layout=blank` (after importing this module)."""
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        if additional_config and additional_config.get("batch_size") is not None:
            args.setdefault("batch_size", additional_config["batch_size"])
        return cls.from_source(args.pop("source"), **args)

    @property
    def max_length(self) -> int:
        return self.config.max_sequence_length

    def _scores(self, pairs: list[tuple[list[int], list[int]]], mask_id: int, what: str) -> list[tuple[float, bool]]:
        """Score (context, continuation) id pairs in batches of similar length, returned in request order."""
        samples = [lay_out(context, continuation, self.tokenizer, self.max_length, self.layout, mask_id)
                   for context, continuation in pairs]
        order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].ids), i))
        results: list[Optional[tuple[float, bool]]] = [None] * len(samples)
        was_training = self.model.training
        self.model.eval()
        try:
            with tqdm(total=len(samples), desc=what, disable=not self.progress) as bar:
                for start in range(0, len(order), self.batch_size):
                    batch = order[start:start + self.batch_size]
                    scored = score_samples(self.model, [samples[i] for i in batch], self.tokenizer.pad_id,
                                           self.config.vocab_size, self.tp_group)
                    for index, result in zip(batch, scored):
                        results[index] = result
                    bar.update(len(batch))
        finally:
            self.model.train(was_training)
        return results

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: the context's trailing spaces move to the continuation; causal: the whole text
        encoded once and split after the context's tokens (as lm-eval's hf backend), blank: each part alone
        (they are separate parts of the sample)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.tokenizer.encode(context)
        if self.layout == "causal":
            return context_ids, self.tokenizer.encode(context + continuation)[len(context_ids):]
        return context_ids, self.tokenizer.encode(continuation)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        return self._scores(pairs, self.mask_id, "loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows, owners = [], []
        for number, request in enumerate(requests):
            tokens = self.tokenizer.encode(request.args[0])
            # lm-eval's windows predict every token once; their first context is a placeholder the layout's own
            # start tokens replace ([gMASK] <sop>, or [CLS] ... [gMASK] <sop>).
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, prefix_token=-1, max_seq_len=self.max_length - 2, context_len=1)):
                windows.append(([t for t in context if t != -1], continuation))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._scores(windows, self.tokenizer.gmask_id, "rolling")):
            totals[owner] += log_prob
        return totals

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in tqdm(requests, desc="generate_until", disable=not self.progress):
            context, options = request.args
            outputs.append(self._generate(context, dict(options)))
        return outputs

    def _generate(self, context: str, options: dict) -> str:
        until = options.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = min(int(options.pop("max_gen_toks", 64)), self.max_length - 3)
        top_p = float(options.get("top_p", 1.0)) if options.get("do_sample") else 0.0
        temperature = float(options.get("temperature", 1.0) or 1.0)
        context_ids = self.tokenizer.encode(context)[-(self.max_length - 2 - max_new):]
        config, model = self.config, self.model
        was_training = model.training
        model.eval()
        try:
            if self.layout == "causal":
                prompt = [self.tokenizer.gmask_id, self.tokenizer.sop_id] + context_ids
                ids = continue_causal(model, prompt, config.max_sequence_length, config.vocab_size, max_new,
                                      frozenset(self.tokenizer.stop_ids), top_p, temperature, tp_group=self.tp_group)
            else:
                _, spans = fill_blanks(model, self.tokenizer, self.tokenizer.decode(context_ids) + "[gMASK]",
                                        config.max_sequence_length, config.vocab_size, max_new, top_p, temperature,
                                        tp_group=self.tp_group)
                ids = spans[-1]  # the [gMASK] blank (the context's own text holds no marker unless it spells one)
        finally:
            model.train(was_training)
        text = self.tokenizer.decode(ids)
        for stop in until:
            if stop:
                text = text.split(stop, 1)[0]
        return text
