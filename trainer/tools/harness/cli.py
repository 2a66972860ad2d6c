"""glm-eval SOURCE --harness TASKS: lm-evaluation-harness tasks on any checkpoint (trainer/tools/evaluate.py parses the
command line and hands over here).

    glm-eval runs/glm-4-debug --harness glm_lastword,glm_cloze --output scores.json
    glm-eval runs/glm-debug --harness glm_local --include-path my_tasks/ --layout blank

Every task name, the include path and the output path are checked before the model is loaded; the results
table goes to stdout and --output gets lm-eval's own results JSON, written to a temporary file and renamed.
The model runs on each rank's accelerator (the CPU without one). Under a launcher (WORLD_SIZE = tp ranks)
every rank evaluates and rank 0 reports.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainer.errors import ConfigError


def add_harness_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("lm-evaluation-harness (--harness; docs/EVALUATION.md)")
    group.add_argument("--harness", metavar="TASKS", help="comma-separated lm-eval task or group names "
                                                          "(shipped: glm_lastword, glm_cloze, glm_docs, glm_lastword_gen, glm_local)")
    group.add_argument("--include-path", type=Path, help="a directory of your own lm-eval task YAMLs")
    group.add_argument("--output", type=Path, help="write lm-eval's results JSON here")
    group.add_argument("--layout", choices=("causal", "blank"), default=None,
                       help="causal: left to right after [gMASK] <sop>; blank: GLM's cloze (context as Part A, "
                            "continuation as Part B). Default: causal for GLM-4's architecture, blank otherwise")
    group.add_argument("--mask-token", choices=("[MASK]", "[gMASK]"), default="[MASK]",
                       help="the blank of the blank layout's loglikelihood requests")
    group.add_argument("--batch-size", type=int, default=16, help="requests per forward")
    group.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")


def run_harness(args: argparse.Namespace) -> int:
    """glm-eval --harness: check the tasks and outputs, load the model, evaluate, report."""
    try:
        import lm_eval  # noqa: F401  (the optional extra)
    except ImportError:
        raise ConfigError("glm-eval --harness needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    from lm_eval.utils import make_table

    from trainer.tools.harness.backend import GLMHarnessLM
    from trainer.tools.harness.run import check_output, evaluate_tasks, prepare_tasks, write_results

    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--batch-size and --limit must be >= 1")
    names = [name.strip() for name in args.harness.split(",")]
    check_output(args.output)
    manager = prepare_tasks(names, args.include_path)
    lm = GLMHarnessLM.from_args(args, layout=args.layout, mask_token=args.mask_token, batch_size=args.batch_size)
    results = evaluate_tasks(lm, names, manager, args.limit)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"layout: {lm.layout}")
        print(make_table(results))
        if args.output is not None:
            write_results(results, args.output)
            print(f"results: {args.output}")
    return 0
