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
    from trainer.checkpoint.cli import main as ckpt
    from trainer.data.prep import main as prep
    from trainer.evaluate import main as evaluate
    from trainer.generate import main as generate
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
     "give --config to glm-launch, not after"),
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
     "--temperature a finite number > 0"),
    ("glm-generate", "top-p above 1", ["<export>", "--text", "x", "--top-p", "2"], "--top-p in [0, 1]"),
    ("glm-generate", "zero new tokens", ["<export>", "--text", "x", "--max-new-tokens", "0"],
     "--max-new-tokens must be >= 1"),
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
]


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
    values = {key: str(path) for key, path in files.items()}
    values["long_text"] = "the cat sat on the mat " * 20
    return values


def run_case(command: str, args: list[str], values: dict[str, str], out: Path) -> tuple[int, list[str]]:
    """Run one case in this process; (exit status, stderr lines)."""
    import contextlib
    import io

    values = {**values, "out": str(out)}
    argv = [re.sub(r"<(\w+)>", lambda m: values[m.group(1)], arg) for arg in args]
    if command == "glm-train":  # first, so that a case's own train.run_dir wins
        argv = ["--set", f"train.run_dir={out}"] + argv
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
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
    code, lines = run_case(command, args, values, out)
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
            _, lines = run_case(command, args, values, root / "out")
            messages[(command, name)] = lines[0].removeprefix("error: ") if lines else "(none)"
        for name, overrides, _ in TRAIN_CASES:
            argv = ["--config", CONFIG] + [arg for item in overrides for arg in ("--set", item)]
            _, lines = run_case("glm-train", argv, values, root / "out")
            messages[("glm-train", name)] = lines[0].removeprefix("error: ") if lines else "(none)"
        for row in table_rows(messages):
            print(row.replace(scratch, "TMP"))


if __name__ == "__main__":
    main()
