"""Running lm-evaluation-harness tasks on the backend: which tasks exist (the shipped local ones in
trainer/tools/harness/tasks/, the user's --include-path, lm-eval's own), the checks that fail before any model is
loaded, the evaluation, and its results in lm-eval's own JSON format or as flat metrics for the training log.

The shipped tasks build their documents from text CPython ships (trainer/tools/harness/local_data.py), so they run
without a network; lm-eval's own tasks download their datasets on first use.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import yaml

from trainer.errors import ConfigError
from trainer.paths import temporary_beside, uncreatable_directory

LOCAL_TASKS = Path(__file__).parent / "tasks"


class _TaskLoader(yaml.SafeLoader):
    """A YAML loader that accepts lm-eval's `!function` tag (a name, checked when the task is built)."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def check_include_path(include_path: Optional[Path]) -> None:
    """Refuse an include path that is not a directory, or that holds a YAML file that does not parse."""
    if include_path is None:
        return
    if not include_path.is_dir():
        raise ConfigError(f"--include-path {include_path} is not a directory of task YAML files")
    for path in sorted(include_path.rglob("*.yaml")):
        try:
            yaml.load(path.read_text(), Loader=_TaskLoader)
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" line {where.line + 1}" if where is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"task file {path}{line} is not valid YAML ({problem}): fix or remove it") from None


def task_manager(include_path: Optional[Path], names: list[str]):
    """lm-eval's TaskManager over the local tasks and include_path, with lm-eval's own tasks indexed too (7 s)
    only when a name is not local; ConfigError naming every task that exists nowhere."""
    from lm_eval.tasks import TaskManager

    check_include_path(include_path)
    paths = [str(LOCAL_TASKS)] + ([str(include_path)] if include_path is not None else [])
    manager = TaskManager(include_path=paths, include_defaults=False)
    if set(names) - set(manager.all_tasks):
        manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        local = sorted(TaskManager(include_path=paths, include_defaults=False).all_tasks)
        raise ConfigError(f"no lm-eval task named {', '.join(unknown)}: local tasks are {', '.join(local)} "
                          f"(--include-path or train.eval_tasks_path add your own YAML tasks; `lm_eval ls tasks` lists "
                          f"lm-eval's)")
    return manager


def prepare_tasks(names: list[str], include_path: Optional[Path] = None):
    """The TaskManager for `names`, each task built once (its documents too) so that a task lm-eval cannot build
    is refused with ConfigError before any model is loaded."""
    # lm-eval warns at every custom_dataset task (all the shipped ones) that it could take keyword arguments
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if not names or not all(names):
        raise ConfigError(f"no task names in {','.join(names)!r}: give comma-separated lm-eval task names")
    manager = task_manager(include_path, names)
    try:
        manager.load(names)
    except Exception as error:  # lm-eval raises what the task's own code raises: every failure is a bad task
        first = str(error).splitlines()[0] if str(error) else ""
        raise ConfigError(f"lm-eval cannot build task(s) {', '.join(names)}: {type(error).__name__}: {first}") from None
    return manager


def evaluate_tasks(lm, names: list[str], manager, limit: Optional[int] = None) -> dict:
    """lm_eval.simple_evaluate on the backend, seeded: lm-eval's results dictionary (results, configs, versions,
    n-shot, ...)."""
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                   limit=limit, log_samples=False, bootstrap_iters=0, random_seed=0,
                                   numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def flat_metrics(results: dict) -> dict[str, float]:
    """lm-eval's results[task]["acc,none"] -> {"task/acc": value}: every numeric metric of every task and group
    but the standard errors, a filter other than `none` kept in the name (`task/exact_match/first_word`)."""
    flat = {}
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            metric, comma, kept = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            flat[f"{task}/{metric}" + ("" if kept in ("", "none") else f"/{kept}")] = float(value)
    return flat


def check_output(output: Optional[Path]) -> None:
    if output is None:
        return
    problem = uncreatable_directory(output.parent) or (f"{output} is a directory" if output.is_dir() else None)
    if problem:
        raise ConfigError(f"--output {output}: {problem}; give a file path in a writable directory")


def write_results(results: dict, output: Path) -> None:
    """The results in lm-eval's own JSON format (as `lm_eval --output_path` writes them), renamed into place."""
    from lm_eval.utils import handle_non_serializable

    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_beside(output)
    try:
        temporary.write_text(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2,
                                        default=handle_non_serializable, ensure_ascii=False))
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
