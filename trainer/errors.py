"""User-facing errors: each one names the problem and the fix, and the CLIs turn it into one line
on stderr and a non-zero exit."""
import argparse
import functools
import os
import sys
from typing import Callable


class GLMError(Exception):
    """Base class of every error meant for the user rather than a traceback."""


class ConfigError(GLMError):
    """A configuration or layout that cannot work."""


class DataError(GLMError):
    """Input text, data files or tokenizer that cannot be used."""


class CheckpointError(GLMError):
    """A checkpoint that is missing, corrupted or does not match the model."""


def echoes_its_node() -> bool:
    """Whether this process is a launcher's rank other than its node's first, failing before the process group
    is up: it checked the same config, arguments and files as the node's first rank (local rank 0), so its error
    would repeat that one's. After the process group is up every failing rank speaks for itself."""
    dist = sys.modules.get("torch.distributed")
    started = dist is not None and dist.is_available() and dist.is_initialized()
    return int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 and not started


def exits_on_error(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a console script's main: a GLMError becomes one line `error: ...` on stderr and exit
    status 2, the contract of every glm-* command. Under a launcher an error found before the ranks meet is
    printed once per node (echoes_its_node)."""

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except GLMError as error:
            if not echoes_its_node():
                print(f"error: {error}", file=sys.stderr)
            return 2

    return guarded


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line `error: ...` and exit status 2 (argparse prints its usage block
    first); `--help` still prints the whole usage."""

    def error(self, message: str) -> None:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
