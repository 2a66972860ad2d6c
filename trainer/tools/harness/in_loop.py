"""lm-evaluation-harness tasks inside the training loop (train.eval_tasks), the way gpt-neox runs them: at every
evaluation step (train.eval_interval and the last step, with the validation loss), on the live model, their
metrics returned as `harness/TASK/METRIC` for metrics.jsonl and TensorBoard.

An evaluation belongs to the step whose metrics record it joins, and that record is written before the step's
checkpoint: a run resumed from the checkpoint of step k continues at step k + 1, so no evaluation is repeated
or skipped. At parallel.pp = 1 the engine's module is a whole GLMModel (a tensor-parallel shard): every rank
scores every request and the tensor ranks gather their logits (config.py refuses pp > 1 and ZeRO-3, whose
weights no rank holds whole). Dropout is off while scoring (the module in eval mode) and restored after.
"""
from __future__ import annotations

from pathlib import Path

from trainer.config import Config


class InLoopHarness:
    """The tasks of train.eval_tasks, checked and built once at the start of the run."""

    def __init__(self, config: Config, model, tokenizer, tp_group=None):
        try:
            import lm_eval  # noqa: F401  (the optional extra)
        except ImportError:
            from trainer.errors import ConfigError

            raise ConfigError("train.eval_tasks needs lm-evaluation-harness: pip install -e '.[eval]'") from None
        from trainer.tools.harness.backend import GLMHarnessLM
        from trainer.tools.harness.run import prepare_tasks

        train = config.train
        self.names = list(train.eval_tasks)
        self.limit = train.eval_tasks_limit or None
        self.manager = prepare_tasks(self.names, Path(train.eval_tasks_path) if train.eval_tasks_path else None)
        self.lm = GLMHarnessLM(model, tokenizer, config.model, tp_group, progress=False)

    def __call__(self) -> dict[str, float]:
        """{"harness/TASK/METRIC": value} of one evaluation of every task ({} on a rank with LOCAL_RANK > 0, which
        scores every request too: its tensor collectives need it)."""
        from trainer.tools.harness.run import evaluate_tasks, flat_metrics

        results = evaluate_tasks(self.lm, self.names, self.manager, self.limit)
        if results is None:  # lm-eval returns the results on LOCAL_RANK 0 only; global rank 0 writes the metrics
            return {}
        return {f"harness/{key}": value for key, value in flat_metrics(results).items()}
