"""User-facing errors: each one names the problem and the fix, and the CLIs turn it into one line
on stderr and a non-zero exit."""
import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Callable


class GLMError(Exception):
    """Base class of every error meant for the user rather than a traceback."""


class ConfigError(GLMError):
    """A configuration or layout that cannot work."""


class DataError(GLMError):
    """Input text, data files or tokenizer that cannot be used."""


class CheckpointError(GLMError):
    """A checkpoint that is missing, corrupted or does not match the model."""


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file the user named (`what`, e.g. "task file"); a DataError naming the file and the fix
    when it is missing, a directory, unreadable or not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path} is a directory: give a file") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#x}): "
                        f"save it as UTF-8") from None
    except OSError as error:
        raise DataError(f"{what} {path} cannot be read ({error.strerror}): check its permissions") from None


def env_int(name: str, default: int, least: int = 0) -> int:
    """The whole number >= least in environment variable `name` (set by a launcher), `default` when unset; a
    ConfigError naming the variable when it holds anything else."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise ConfigError(f"environment variable {name}={text[:40]!r} is not a whole number >= {least}: a launcher "
                          f"sets it (glm-launch, deepspeed, torchrun); unset it to run one process")
    return value


def echoes_its_node() -> bool:
    """Whether this process is a launcher's rank other than its node's first, failing before the process group
    is up: it checked the same config, arguments and files as the node's first rank (local rank 0), so its error
    would repeat that one's. After the process group is up every failing rank speaks for itself."""
    dist = sys.modules.get("torch.distributed")
    started = dist is not None and dist.is_available() and dist.is_initialized()
    local_rank = os.environ.get("LOCAL_RANK", "0").strip()
    return local_rank.isdigit() and int(local_rank) > 0 and not started


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
