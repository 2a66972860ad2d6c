"""Bad input to every command, in one table: each case must give exit status 2, exactly one stderr line
`error: ...` containing the expected words, and write nothing. docs/RELIABILITY.md lists every case with
its full message (`python -m tests.test_bad_inputs` prints that table); a test keeps the two in step.
glm-train's config cases live in tests/test_train_errors.py and join the table."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.test_train_errors import CASES as TRAIN_CASES

CONFIG = "configs/glm-debug.yaml"
TINY_EXPORT_TEXTS = ["the cat sat on the mat. the dog sat on the log."] * 20


def commands() -> dict[str, Callable[[list[str]], int]]:
    from launch.cli import main as launch
    from trainer.bench import main as bench
    from trainer.tools.ckpt import main as ckpt
    from trainer.data.prep import main as prep
    from trainer.tools.evaluate import main as evaluate
    from trainer.tools.generate import main as generate
    from trainer.train import main as train

    return {"glm-prep": prep, "glm-train": train, "glm-launch": launch, "glm-ckpt": ckpt, "glm-generate": generate,
            "glm-eval": evaluate, "glm-bench": bench}


# (command, what is wrong, arguments with <placeholders>, words the message must hold). <out> is where the
# command would write (it must not exist afterwards); the other placeholders are files made by inputs().
CASES = [
    ("glm-prep", "no input given", ["--output-prefix", "<out>/c"], "one of the arguments"),
    ("glm-prep", "input file missing", ["--input", "<dir>/absent.txt", "--output-prefix", "<out>/c"], "absent.txt"),
    ("glm-prep", "output prefix under a file", ["--input", "<text>", "--output-prefix", "<file>/c"], "is a file"),
    ("glm-prep", "vocabulary of 0", ["--input", "<text>", "--output-prefix", "<out>/c", "--vocab-size", "0"],
     "vocab size 0 is too small"),
    ("glm-prep", "vocabulary below the special tokens", ["--input", "<text>", "--output-prefix", "<out>/c",
                                                         "--vocab-size", "5"], "vocab size 5 is too small"),
    ("glm-prep", "input without output prefix", ["--input", "<text>"], "--input needs --output-prefix"),
    ("glm-prep", "special tokens without a tokenizer", ["--input", "<text>", "--output-prefix", "<out>/c",
                                                        "--add-special-tokens"], "--add-special-tokens needs"),
    ("glm-prep", "zero workers", ["--input", "<text>", "--output-prefix", "<out>/c", "--workers", "0"],
     "--workers must be >= 1"),
    ("glm-prep", "tokenizer file missing", ["--input", "<text>", "--output-prefix", "<out>/c", "--tokenizer",
                                            "<dir>/absent.json"], "absent.json"),
    ("glm-prep", "instructions that are not JSON", ["--input", "<text>", "--output-prefix", "<out>/c",
                                                    "--instructions"], "JSON"),
    ("glm-prep", "an output name taken by a directory", ["--input", "<text>", "--output-prefix", "<dir>/taken"],
     "taken.tokenizer.json is a directory"),
    ("glm-prep", "sequence too short for a sample", ["--embedded", "--samples", "1", "--seq-length", "4"],
     "seq_length=4 is too short"),
    ("glm-prep", "unknown flag", ["--embedded", "--bogus-flag"], "unrecognized arguments"),
    ("glm-train", "config file missing", ["--config", "<dir>/absent.yaml"], "does not exist"),
    ("glm-train", "config not YAML", ["--config", "<bad_yaml>"], "is not valid YAML"),
    ("glm-train", "empty config", ["--config", "<empty_yaml>"], "is empty"),
    ("glm-train", "key given twice", ["--config", "<twice_yaml>"], "is given twice (line 3)"),
    ("glm-train", "config not a mapping", ["--config", "<list_yaml>"], "must hold a mapping of sections"),
    ("glm-train", "no --config", [], "the following arguments are required: --config"),
    ("glm-launch", "port out of range", ["--config", CONFIG, "--nproc", "2", "--master-port", "99999"],
     "--master-port 99999 is not a TCP port"),
    ("glm-launch", "more GPUs than present", ["--config", CONFIG, "--gpus", "64", "--gpu-memory", "80GB"],
     "more GPUs than this node has"),
    ("glm-launch", "hostfile missing", ["--config", CONFIG, "--hostfile", "<dir>/absent-hostfile"], "absent-hostfile"),
    ("glm-launch", "hostfile line without slots", ["--config", CONFIG, "--hostfile", "<bad_hostfile>", "--dry-run"],
     "slots="),
    ("glm-launch", "--config after --", ["--config", CONFIG, "--nproc", "2", "--", "--config", CONFIG],
     "give --config to glm-launch, not --config"),
    ("glm-launch", "tp that divides no head count", ["--config", CONFIG, "--nproc", "3", "--tp", "3", "--dry-run"],
     "tp"),
    ("glm-launch", "no device option on a machine without GPUs", ["--config", CONFIG], "pass --nproc N"),
    ("glm-ckpt", "source missing", ["export", "<dir>/absent", "--out", "<out>"], "does not exist"),
    ("glm-ckpt", "source of no known kind", ["export", "<dir>", "--out", "<out>"], "is neither an export"),
    ("glm-ckpt", "not a release", ["import-thudm", "<export>", "--out", "<out>"], "is not a THUDM/GLM release"),
    ("glm-ckpt", "output under a file", ["export", "<export>", "--out", "<file>/x"], "is a file"),
    ("glm-ckpt", "tp that divides no head count", ["convert", "<export>", "--to-tp", "3", "--to-pp", "1",
                                                   "--out", "<out>"], "not divisible by parallel.tp=3"),
    ("glm-ckpt", "pp above the blocks", ["convert", "<export>", "--to-tp", "1", "--to-pp", "9", "--out", "<out>"],
     "--to-pp 9"),
    ("glm-ckpt", "export tokenizer missing", ["export", "<export>", "--out", "<out>", "--tokenizer",
                                              "<dir>/absent.json"], "absent.json"),
    ("glm-ckpt", "unknown subcommand", ["exprot", "<export>"], "invalid choice"),
    ("glm-ckpt", "not a transformers directory", ["import-hf", "<export>", "--out", "<out>"],
     "is not a transformers checkpoint"),
    ("glm-ckpt", "a GLM transformers cannot express", ["export", "<export>", "--out", "<out>", "--format", "hf"],
     "transformers"),
    ("glm-ckpt", "shard size 0", ["export", "<export>", "--out", "<out>", "--format", "hf", "--max-shard-gb", "0"],
     "--max-shard-gb must be > 0"),
    ("glm-ckpt", "output over its source", ["convert", "<export>", "--to-tp", "1", "--to-pp", "1", "--out",
                                            "<export>"], "is the source itself"),
    ("glm-ckpt", "output inside its source", ["export", "<export>", "--out", "<export>/again"],
     "is inside the source"),
    ("glm-ckpt", "output directory holding files", ["export", "<export>", "--out", "<bare_export>"],
     "already holds files"),
    ("glm-generate", "source missing", ["<dir>/absent", "--text", "x"], "does not exist"),
    ("glm-generate", "temperature not a number", ["<export>", "--text", "x", "--temperature", "nan"],
     "--temperature must be a finite number >= 0.0001"),
    ("glm-generate", "top-p above 1", ["<export>", "--text", "x", "--top-p", "2"], "--top-p must be 0 (greedy) or in"),
    ("glm-generate", "zero new tokens", ["<export>", "--text", "x", "--max-new-tokens", "0"],
     "--max-new-tokens must be >= 1, got 0"),
    ("glm-generate", "prompt past the positions", ["<export>", "--text", "<long_text>"], "positions: shorten it"),
    ("glm-generate", "no tokenizer", ["<bare_export>", "--text", "x"], "no tokenizer"),
    ("glm-generate", "tokenizer file missing", ["<export>", "--text", "x", "--tokenizer", "<dir>/absent.json"],
     "absent.json"),
    ("glm-generate", "no --text", ["<export>"], "--text"),
    ("glm-generate", "--chat without role tokens", ["<export>", "--chat", "--text", "x"],
     "needs a GLM-4-style tokenizer"),
    ("glm-eval", "task file missing", ["<export>", "--data", "<dir>/absent.jsonl", "--verbalizers",
                                        '{"yes": " sat", "no": " log"}'], "absent.jsonl"),
    ("glm-eval", "verbalizers not JSON", ["<export>", "--data", "<task>", "--verbalizers", "{a: "], "--verbalizers"),
    ("glm-eval", "template without [MASK]", ["<export>", "--data", "<task>", "--template", "{text}",
                                             "--verbalizers", '{"yes": " sat", "no": " log"}'], "[MASK]"),
    ("glm-eval", "malformed template", ["<export>", "--data", "<task>", "--template", "{text [MASK]",
                                        "--verbalizers", '{"yes": " sat", "no": " log"}'], "--template"),
    ("glm-eval", "template field missing", ["<export>", "--data", "<task>", "--template", "{sentence} [MASK]",
                                            "--verbalizers", '{"yes": " sat", "no": " log"}'], "sentence"),
    ("glm-eval", "label without verbalizer", ["<export>", "--data", "<task>", "--template", "{text} [MASK]",
                                              "--verbalizers", '{"yes": " sat", "maybe": " mat"}'], "'no'"),
    ("glm-eval", "prompt past the positions", ["<export>", "--data", "<long_task>", "--template", "{text} [MASK]",
                                               "--verbalizers", '{"yes": " sat", "no": " log"}'], "positions"),
    ("glm-bench", "zero timed steps", ["--config", CONFIG, "--steps", "0"], "--steps"),
    ("glm-bench", "bad config key", ["--config", CONFIG, "--set", "model.hiden_size=8"], "did you mean model.hidden_size"),
    ("glm-bench", "data prefix missing", ["--config", CONFIG, "--set", "data.path=<dir>/absent"], "absent"),
    # Files that are not what they claim (a traceback before these were checked at their source).
    ("glm-train", "config not UTF-8", ["--config", "<latin1_yaml>"], "is not UTF-8 text (byte 23 is 0xe9)"),
    ("glm-train", "config is a directory", ["--config", "<dir>"], "is a directory: pass a YAML file"),
    ("glm-train", "YAML alias bomb", ["--config", "<bomb_yaml>"], "expands to more than 100000 values"),
    ("glm-train", "YAML anchor that contains itself", ["--config", "<recursive_yaml>"], "refers to itself"),
    ("glm-train", "--set alias bomb", ["--config", CONFIG, "--set", "<bomb_value>"], "expands to more than"),
    ("glm-train", "DeepSpeed JSON is a directory", ["--config", CONFIG, "--set", "train.deepspeed_config=<dir>"],
     "is a directory: point it at a DeepSpeed JSON file"),
    ("glm-train", "DeepSpeed JSON clipping a string", ["--config", CONFIG, "--set", "train.deepspeed_config=<clip_json>"],
     "sets gradient_clipping='1.0' but optim.grad_clip is 1.0"),
    ("glm-train", "DeepSpeed JSON optimizer section", ["--config", CONFIG, "--set",
                                                       "train.deepspeed_config=<optimizer_json>"],
     "has an 'optimizer' section, which the trainer would not use"),
    ("glm-train", "DeepSpeed JSON scheduler section", ["--config", CONFIG, "--set",
                                                       "train.deepspeed_config=<scheduler_json>"],
     "has an 'scheduler' section"),
    ("glm-train", "DeepSpeed JSON not UTF-8", ["--config", CONFIG, "--set", "train.deepspeed_config=<latin1_yaml>"],
     "is not valid JSON"),
    ("glm-train", "run dir a symlink loop", ["--config", CONFIG, "--set", "train.run_dir=<loop>/run"],
     "is a symbolic link that leads nowhere"),
    ("glm-train", "index offsets decreasing", ["--config", CONFIG, "--set", "data.path=<decreasing_idx>"],
     "document offsets that do not start at 0 and rise"),
    ("glm-train", "index offsets past the tokens", ["--config", CONFIG, "--set", "data.path=<overlong_idx>"],
     "the .bin is truncated or belongs to another .idx"),
    ("glm-train", "index header promising too many documents", ["--config", CONFIG, "--set", "data.path=<huge_idx>"],
     "the file is truncated or corrupted"),
    ("glm-train", "WORLD_SIZE not a number", ["--config", CONFIG], "environment variable WORLD_SIZE='abc'"),
    ("glm-train", "WORLD_SIZE zero", ["--config", CONFIG], "environment variable WORLD_SIZE='0'"),
    ("glm-train", "micro-batch of 10^9", ["--config", CONFIG, "--set", "parallel.micro_batch_size=1000000000",
                                          "--set", "parallel.global_batch_size=1000000000"],
     "of logits for parallel.micro_batch_size=1000000000"),
    ("glm-train", "sequence of 10^9", ["--config", CONFIG, "--set", "data.seq_length=1000000000", "--set",
                                       "model.max_sequence_length=1000000000"], "data.seq_length=1000000000 is above"),
    ("glm-train", "data entry weight not a number", ["--config", CONFIG, "--set",
                                                     "data.datasets=[{path: '', weight: .nan}]"], "with w > 0"),
    ("glm-launch", "--tp 0", ["--config", CONFIG, "--nproc", "2", "--tp", "0", "--dry-run"], "--tp must be >= 1, got 0"),
    ("glm-launch", "--pp negative", ["--config", CONFIG, "--nproc", "2", "--pp", "-1", "--dry-run"],
     "--pp must be >= 1, got -1"),
    ("glm-launch", "--micro-batch 0", ["--config", CONFIG, "--nproc", "2", "--micro-batch", "0", "--dry-run"],
     "--micro-batch must be >= 1"),
    ("glm-launch", "--recompute-interval negative", ["--config", CONFIG, "--nproc", "2", "--recompute-interval", "-2",
                                                     "--dry-run"], "--recompute-interval must be >= 0"),
    ("glm-launch", "master port busy", ["--config", CONFIG, "--nproc", "1", "--master-port", "<busy_port>"],
     "is in use on this machine"),
    ("glm-launch", "hostfile not UTF-8", ["--config", CONFIG, "--hostfile", "<latin1_yaml>", "--dry-run"],
     "is not UTF-8 text"),
    ("glm-launch", "hostfile is a directory", ["--config", CONFIG, "--hostfile", "<dir>", "--dry-run"], "does not exist"),
    ("glm-launch", "SLURM node list garbage", ["--config", CONFIG, "--nproc", "1", "--dry-run"],
     "SLURM node list 'gpu[a-b]' has the range [a-b]"),
    ("glm-launch", "SLURM node range too long", ["--config", CONFIG, "--nproc", "1", "--dry-run"],
     "not 'low-high' of at most 100000 nodes"),
    ("glm-launch", "SLURM GPU count garbage", ["--config", CONFIG, "--dry-run"], "SLURM_GPUS_ON_NODE='lots'"),
    ("glm-launch", "SLURM node id garbage", ["--config", CONFIG, "--nproc", "1", "--master-port", "<busy_port>"],
     "SLURM_NODEID='first'"),
    ("glm-launch", "bad YAML merge key target", ["--config", "<bad_merge_yaml>", "--nproc", "1", "--dry-run"],
     "is not valid YAML"),
    ("glm-ckpt", "--to-tp 0", ["convert", "<export>", "--to-tp", "0", "--to-pp", "1", "--out", "<out>"],
     "--to-tp and --to-pp must be >= 1, got 0 and 1"),
    ("glm-ckpt", "--to-tp negative", ["convert", "<export>", "--to-tp", "-1", "--to-pp", "1", "--out", "<out>"],
     "got -1 and 1"),
    ("glm-ckpt", "--to-pp 0", ["convert", "<export>", "--to-tp", "1", "--to-pp", "0", "--out", "<out>"],
     "got 1 and 0"),
    ("glm-ckpt", "export config not JSON", ["export", "<export_bad_json>", "--out", "<out>"],
     "config.json is not valid JSON"),
    ("glm-ckpt", "export config lacking keys", ["export", "<export_no_keys>", "--out", "<out>"],
     "lacks the model's num_layers, hidden_size"),
    ("glm-ckpt", "export config of another format", ["export", "<export_other_format>", "--out", "<out>"],
     "is not a glm-export config"),
    ("glm-ckpt", "export config not UTF-8", ["export", "<export_latin1>", "--out", "<out>"], "is not UTF-8 text"),
    ("glm-generate", "export config not JSON", ["<export_bad_json>", "--text", "x"], "config.json is not valid JSON"),
    ("glm-generate", "--text not UTF-8", ["<export>", "--text", "caf\udce9"], "--text is not UTF-8 text (byte 0xe9"),
    ("glm-generate", "top-p below float32", ["<export>", "--text", "x", "--top-p", "1e-300"], "got 1e-300"),
    ("glm-generate", "negative top-p", ["<export>", "--text", "x", "--top-p", "-0.5"], "got -0.5"),
    ("glm-generate", "temperature underflowing", ["<export>", "--text", "x", "--temperature", "1e-45"],
     "(for greedy decoding use --top-p 0), got 1e-45"),
    ("glm-generate", "temperature zero", ["<export>", "--text", "x", "--temperature", "0"], "got 0.0"),
    ("glm-generate", "temperature infinite", ["<export>", "--text", "x", "--temperature", "inf"], "got inf"),
    ("glm-generate", "seed of 2^64", ["<export>", "--text", "x", "--seed", "18446744073709551616"],
     "--seed must be in [0, 2**63)"),
    ("glm-generate", "tokenizer larger than the model", ["<export>", "--text", "x", "--tokenizer", "<big_tokenizer>"],
     "have no embedding; use the tokenizer the model was trained with"),
    ("glm-generate", "WORLD_SIZE not a number", ["<export>", "--text", "x"], "environment variable WORLD_SIZE='2x'"),
    ("glm-eval", "task file not UTF-8", ["<export>", "--data", "<latin1_yaml>", "--verbalizers",
                                         '{"yes": " sat", "no": " log"}'], "task file"),
    ("glm-eval", "task file is a directory", ["<export>", "--data", "<dir>", "--verbalizers",
                                              '{"yes": " sat", "no": " log"}'], "is a directory: give a file"),
    ("glm-eval", "record a list", ["<export>", "--data", "<list_task>", "--verbalizers", '{"yes": " sat", "no": " log"}'],
     "line 2 is list"),
    ("glm-eval", "record a number", ["<export>", "--data", "<number_task>", "--verbalizers",
                                     '{"yes": " sat", "no": " log"}'], "line 1 is int"),
    ("glm-eval", "label a list", ["<export>", "--data", "<list_label_task>", "--verbalizers",
                                  '{"yes": " sat", "no": " log"}'], "a string 'label'"),
    ("glm-eval", "verbalizer not a string", ["<export>", "--data", "<task>", "--verbalizers", '{"yes": 1, "no": 2}'],
     "words (strings)"),
    ("glm-eval", "tokenizer larger than the model", ["<export>", "--data", "<task>", "--tokenizer", "<big_tokenizer>",
                                                     "--verbalizers", '{"yes": " sat", "no": " log"}'], "have no embedding"),
    ("glm-bench", "peak TFLOP/s of 0", ["--config", CONFIG, "--peak-tflops", "0"], "--peak-tflops must be a finite"),
    ("glm-bench", "negative peak TFLOP/s", ["--config", CONFIG, "--peak-tflops", "-5"], "got -5"),
    ("glm-bench", "peak TFLOP/s not a number", ["--config", CONFIG, "--peak-tflops", "nan"], "got nan"),
    ("glm-bench", "tensor parallelism it would not run", ["--config", CONFIG, "--set", "parallel.tp=2"],
     "--set parallel.tp=2 would not be measured"),
    ("glm-bench", "pipeline it would not run", ["--config", CONFIG, "--set", "parallel.pp=2"], "parallel.pp=2"),
    ("glm-bench", "WORLD_SIZE not a number", ["--config", CONFIG], "environment variable WORLD_SIZE='many'"),
    ("glm-prep", "output prefix a directory", ["--input", "<text>", "--output-prefix", "<out>/"],
     "names a directory, not a file prefix"),
    ("glm-prep", "output prefix an existing directory", ["--input", "<text>", "--output-prefix", "<dir>"],
     "names a directory"),
    ("glm-prep", "sequence of 10^9", ["--embedded", "--samples", "1", "--seq-length", "1000000000"],
     "data.seq_length=1000000000 is above 2097152"),
    ("glm-prep", "sequence not an integer", ["--embedded", "--samples", "1", "--seq-length", "1e9"], "invalid int value"),
]

ENVIRONMENTS = {
    "WORLD_SIZE not a number": {"WORLD_SIZE": "abc"}, "WORLD_SIZE zero": {"WORLD_SIZE": "0"},
    "SLURM node list garbage": {"SLURM_JOB_NODELIST": "gpu[a-b]"},
    "SLURM node range too long": {"SLURM_JOB_NODELIST": "gpu[1-999999999]"},
    "SLURM GPU count garbage": {"SLURM_JOB_NODELIST": "gpu1", "SLURM_GPUS_ON_NODE": "lots"},
    "SLURM node id garbage": {"SLURM_JOB_NODELIST": "gpu1", "SLURM_NODEID": "first"},
}
"""Environment variables set for a case (by its name; glm-generate's and glm-bench's WORLD_SIZE cases below)."""
CASE_ENVIRONMENTS = {("glm-generate", "WORLD_SIZE not a number"): {"WORLD_SIZE": "2x"},
                     ("glm-bench", "WORLD_SIZE not a number"): {"WORLD_SIZE": "many"}}


def _tiny_export(directory: Path, with_tokenizer: bool) -> Path:
    from trainer.checkpoint.export import write_export
    from trainer.data.tokenizer import train_tokenizer
    from trainer.model import GLMModel
    from trainer.model.config import ModelConfig

    tokenizer = train_tokenizer(TINY_EXPORT_TEXTS, 300)
    config = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=tokenizer.vocab_size,
                         max_sequence_length=32, hidden_dropout=0.0, attention_dropout=0.0)
    weights = GLMModel(config, seed=1).state_dict()
    weights["embedding.word_embeddings.weight"] = weights["embedding.word_embeddings.weight"][:config.vocab_size]
    tokenizer.save(directory.parent / "tokenizer.json")
    write_export(weights, config, directory, directory.parent / "tokenizer.json" if with_tokenizer else None)
    return directory


def inputs(root: Path) -> dict[str, str]:
    """The files the cases point at, made under root."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"dir": root, "text": root / "corpus.txt", "file": root / "a_file", "bad_yaml": root / "bad.yaml",
             "empty_yaml": root / "empty.yaml", "twice_yaml": root / "twice.yaml", "list_yaml": root / "list.yaml",
             "bad_hostfile": root / "hostfile", "task": root / "task.jsonl", "long_task": root / "long.jsonl"}
    files["text"].write_text("\n".join(TINY_EXPORT_TEXTS))
    files["file"].write_text("x")
    (root / "taken.tokenizer.json").mkdir()
    files["bad_yaml"].write_text("model: {num_layers: [\n")
    files["empty_yaml"].write_text("# nothing\n")
    files["twice_yaml"].write_text("train:\n  steps: 3\n  steps: 4\n")
    files["list_yaml"].write_text("- model\n")
    files["bad_hostfile"].write_text("node1 gpus=8\n")
    files["task"].write_text(json.dumps({"text": "the cat sat", "label": "yes"}) + "\n"
                             + json.dumps({"text": "the dog sat", "label": "no"}) + "\n")
    files["long_task"].write_text(json.dumps({"text": "the cat sat on the mat " * 20, "label": "yes"}) + "\n")
    files["export"] = _tiny_export(root / "export", with_tokenizer=True)
    files["bare_export"] = _tiny_export(root / "bare" / "export", with_tokenizer=False)
    files.update(_broken_files(root, files["export"]))
    values = {key: str(path) for key, path in files.items()}
    values["long_text"] = "the cat sat on the mat " * 20
    values["bomb_value"] = "model.num_layers=" + alias_bomb(flow=True)
    values["busy_port"] = str(_busy_port())
    return values


def alias_bomb(flow: bool = False) -> str:
    """YAML whose nine levels of aliases stand for 10^9 values (a few hundred bytes of text)."""
    levels = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"&l{k} [{', '.join([f'*l{k - 1}'] * 10)}]" for k in range(1, 10)]
    if flow:
        return "[" + ", ".join(levels) + "]"
    return "bomb:\n" + "".join(f"  - {level}\n" for level in levels) + "model:\n  num_layers: *l9\n"


_LISTENING = []  # the sockets of _busy_port, open while the module's cases run


def _busy_port() -> int:
    import socket

    listener = socket.socket()
    listener.bind(("", 0))
    listener.listen()
    _LISTENING.append(listener)
    return listener.getsockname()[1]


def _broken_files(root: Path, export: Path) -> dict[str, Path]:
    """Files that are not what they claim: non-UTF-8 text, YAML and JSON of the wrong shape, corrupted indexes and
    export configs, a symlink loop, a tokenizer larger than the export's vocabulary."""
    import shutil

    import numpy as np

    from trainer.data.indexed import HEADER, IndexedDatasetWriter
    from trainer.data.tokenizer import train_tokenizer

    files = {name: root / name for name in ("latin1_yaml", "bomb_yaml", "recursive_yaml", "bad_merge_yaml",
                                            "clip_json", "optimizer_json", "scheduler_json", "list_task",
                                            "number_task", "list_label_task")}
    files["latin1_yaml"].write_bytes(b"train:\n  steps: 3\n# caf\xe9\n")
    files["bomb_yaml"].write_text(alias_bomb())
    files["recursive_yaml"].write_text("model: &a {num_layers: 4, inner: *a}\n")
    files["bad_merge_yaml"].write_text("model:\n  <<: 5\n")
    files["clip_json"].write_text(json.dumps({"gradient_clipping": "1.0"}))
    files["optimizer_json"].write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}))
    files["scheduler_json"].write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    good = json.dumps({"text": "the cat sat", "label": "yes"})
    files["list_task"].write_text(good + "\n[1, 2]\n")
    files["number_task"].write_text("5\n")
    files["list_label_task"].write_text(json.dumps({"text": "the cat sat", "label": ["yes"]}) + "\n")
    files["loop"] = root / "loop"
    files["loop"].symlink_to(files["loop"])
    for name, offsets, documents in (("decreasing_idx", [0, 5, 3, 8], 3), ("overlong_idx", [0, 4, 9000], 2),
                                     ("huge_idx", [0, 4, 8], 10 ** 12)):
        prefix = root / name
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document(np.arange(4))
            writer.add_document(np.arange(4))
        idx = Path(f"{prefix}.idx")
        idx.write_bytes(idx.read_bytes()[:8] + HEADER.pack(b"", 1, 2, documents)[8:]
                        + np.asarray(offsets, dtype=np.int64).tobytes())
        Path(f"{prefix}.bin").write_bytes(np.arange(8, dtype=np.uint16).tobytes())
        shutil.copyfile(export / "tokenizer.json", f"{prefix}.tokenizer.json")
        files[name] = prefix
    for name, config in (("export_bad_json", b"{nope"), ("export_latin1", b'{"format": "caf\xe9"}'),
                         ("export_no_keys", json.dumps({"format": "glm-export", "model": {"vocab_size": 300}}).encode()),
                         ("export_other_format", json.dumps({"format": "other", "model": {}}).encode())):
        files[name] = root / name
        shutil.copytree(export, files[name])
        (files[name] / "config.json").write_bytes(config)
    big = train_tokenizer([f"word{i} other{i * 7} thing{i * 13}" for i in range(400)] + TINY_EXPORT_TEXTS, 1000)
    files["big_tokenizer"] = root / "big_tokenizer.json"
    big.save(files["big_tokenizer"])
    return files


def _environment(command: str, name: str) -> dict[str, str]:
    return CASE_ENVIRONMENTS.get((command, name), ENVIRONMENTS.get(name, {}) if command in ("glm-train", "glm-launch")
                                 else {})


def run_case(command: str, args: list[str], values: dict[str, str], out: Path,
             environment: dict[str, str] = {}) -> tuple[int, list[str]]:
    """Run one case in this process, with `environment` added to os.environ; (exit status, stderr lines)."""
    import contextlib
    import io
    from unittest import mock

    values = {**values, "out": str(out)}
    argv = [re.sub(r"<(\w+)>", lambda m: values[m.group(1)], arg) for arg in args]
    if command == "glm-train":  # first, so that a case's own train.run_dir wins
        argv = ["--set", f"train.run_dir={out}"] + argv
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), \
            mock.patch.dict(os.environ, environment):
        try:
            code = commands()[command](argv)
        except SystemExit as stop:  # argparse exits from inside main
            code = stop.code
    return code, stderr.getvalue().strip().splitlines()


@pytest.fixture(scope="module")
def values(tmp_path_factory):
    torch.set_num_threads(1)
    return inputs(tmp_path_factory.mktemp("bad-inputs"))


@pytest.mark.parametrize("command, name, args, words", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(values, tmp_path, command, name, args, words):
    out = tmp_path / "out"
    code, lines = run_case(command, args, values, out, _environment(command, name))
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not out.exists()


def table_rows(messages: dict[tuple[str, str], str]) -> list[str]:
    keys = [(command, name) for command, name, _, _ in CASES] + [("glm-train", name) for name, _, _ in TRAIN_CASES]
    rows = ["| command | bad input | message |", "|---|---|---|"]
    return rows + [f"| `{command}` | {name} | `{messages[(command, name)].replace('|', chr(92) + '|')}` |"
                   for command, name in keys]


def test_docs_list_every_case():
    text = Path("docs/RELIABILITY.md").read_text()
    documented = {(m.group(1), m.group(2)): m.group(3)
                  for m in re.finditer(r"^\| `(glm-[a-z]+)` \| (.+?) \| `(.*)` \|$", text, re.MULTILINE)}
    expected = [(c, n, w) for c, n, _, w in CASES] + [("glm-train", n, w) for n, _, w in TRAIN_CASES]
    missing = [(c, n) for c, n, w in expected if w.replace("|", "\\|") not in documented.get((c, n), "")]
    assert not missing, f"run: python -m tests.test_bad_inputs, and put its table in docs/RELIABILITY.md: {missing}"
    assert len(expected) >= 60


def main() -> None:
    """Print the markdown table of every case with the message it gives now (temporary paths as TMP)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        values = inputs(root / "inputs")
        messages = {}
        for command, name, args, _ in CASES:
            _, lines = run_case(command, args, values, root / "out", _environment(command, name))
            messages[(command, name)] = lines[0].removeprefix("error: ") if lines else "(none)"
        for name, overrides, _ in TRAIN_CASES:
            argv = ["--config", CONFIG] + [arg for item in overrides for arg in ("--set", item)]
            _, lines = run_case("glm-train", argv, values, root / "out")
            messages[("glm-train", name)] = lines[0].removeprefix("error: ") if lines else "(none)"
        for row in table_rows(messages):
            print(row.replace(scratch, "TMP"))


if __name__ == "__main__":
    main()
