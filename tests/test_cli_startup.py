"""What a user meets before any work starts: `--help` answers at once, without importing DeepSpeed (2+ s, and on a
machine without a GPU it used to log "Setting accelerator to CPU" first), and no command prints that line."""
import os
import subprocess
import sys

import pytest

COMMANDS = {"glm-prep": "trainer.data.prep", "glm-train": "trainer.train", "glm-launch": "launch.cli",
            "glm-ckpt": "trainer.tools.ckpt", "glm-generate": "trainer.tools.generate",
            "glm-eval": "trainer.tools.evaluate"}

PROBE = """
import sys
from {module} import main
try:
    main(["--help"])
except SystemExit as stop:
    assert stop.code == 0, stop.code
loaded = sorted(name for name in sys.modules if name == "deepspeed" or name.startswith("deepspeed."))
print("DEEPSPEED-MODULES", len(loaded), loaded[:3])
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}  # as a user's shell has it
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_does_not_import_deepspeed(command):
    result = _run(PROBE.format(module=COMMANDS[command]))
    assert result.returncode == 0, result.stderr
    assert command in result.stdout  # the usage line names the command
    assert "DEEPSPEED-MODULES 0 []" in result.stdout, result.stdout[-300:]


def test_deepspeed_s_cpu_fallback_notice_is_not_printed():
    result = _run("import trainer.engine.build")  # imports DeepSpeed; the accelerator is detected on import
    assert result.returncode == 0, result.stderr
    assert "Setting accelerator" not in result.stdout + result.stderr
