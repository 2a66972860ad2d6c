"""Every command's argument errors are one line `error: ...` and exit status 2 (trainer/errors.py), like
every other bad input; `--help` still prints the whole usage."""
import importlib

import pytest

COMMANDS = {"glm-train": "trainer.train", "glm-prep": "trainer.data.prep", "glm-generate": "trainer.tools.generate",
            "glm-eval": "trainer.tools.evaluate", "glm-ckpt": "trainer.tools.ckpt", "glm-bench": "trainer.bench.cli",
            "glm-launch": "launch.cli"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unknown_argument_is_one_line_and_exit_2(command, capsys):
    main = importlib.import_module(COMMANDS[command]).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--no-such-flag"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith(f"(see {command} --help)"), err


def test_help_still_prints_the_usage(capsys):
    from trainer.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: glm-train")


def test_under_a_launcher_an_error_before_the_ranks_meet_is_printed_once_per_node(tmp_path):
    from tests.glm_processes import start_ranks, train_args, wait_all

    procs = start_ranks(train_args(tmp_path / "run", 2, "parallel.tp=3"), 2, tmp_path)
    assert wait_all(procs, timeout=120) == [2, 2]
    logs = [[line for line in (tmp_path / f"rank{rank}.log").read_text().splitlines() if "error" in line]
            for rank in (0, 1)]
    assert len(logs[0]) == 1 and logs[0][0].startswith("error: ") and "parallel.tp=3" in logs[0][0], logs
    assert logs[1] == []
    assert not (tmp_path / "run").exists()
