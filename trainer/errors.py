"""User-facing errors: each one names the problem and the fix, and the CLIs turn it into one line
on stderr and a non-zero exit."""
import argparse
import functools
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


def exits_on_error(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a console script's main: a GLMError becomes one line `error: ...` on stderr and exit
    status 2, the contract of every glm-* command."""

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except GLMError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return guarded


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line `error: ...` and exit status 2 (argparse prints its usage block
    first); `--help` still prints the whole usage."""

    def error(self, message: str) -> None:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
