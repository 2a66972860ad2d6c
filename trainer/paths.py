"""Where an output may go: the checks every command makes before it writes anything, and how it is published
(whole, by a rename of a file or a directory written beside it)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional


def nearest_existing(path: Path) -> Path:
    """The path itself, or its nearest ancestor that exists (absolute)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def uncreatable_directory(directory: Path) -> Optional[str]:
    """Why `directory` cannot be used or created for writing (a file in the way, no write permission), or
    None when it can."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        return f"{directory} is a file"
    anchor = nearest_existing(directory)
    for part in (directory.absolute(), *directory.absolute().parents):
        if part == anchor:
            break
        if part.is_symlink():  # exists() is False for it: the link is dangling or a loop
            return f"{part} is a symbolic link that leads nowhere (dangling, or a loop)"
    if not anchor.is_dir():
        return f"{anchor} is a file, so {directory} cannot be created under it"
    if not os.access(anchor, os.W_OK | os.X_OK):
        return f"{anchor} is not writable"
    return None


def overlap(source: Path, output: Path) -> Optional[str]:
    """How `output` would write into or over `source` (the same path, one inside the other, symbolic links
    followed), or None when they are apart."""
    source, output = Path(source).resolve(), Path(output).resolve()
    if source == output:
        return "is the source itself"
    if source in output.parents:
        return f"is inside the source {source}"
    if output in source.parents:
        return f"holds the source {source}"
    return None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yields a new hidden directory beside `final` to write an output into. When the block ends without an
    exception it is renamed onto `final` (which must not exist, or be an empty directory); when it raises, it
    is deleted with the parent directories made for it. A reader sees the whole output or none of it."""
    final = Path(final).absolute()
    anchor = nearest_existing(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would be the output's mode
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for made in [final.parent, *final.parent.parents]:
            if made == anchor:
                break
            if not any(made.iterdir()):
                made.rmdir()
        raise


def temporary_beside(final: Path) -> Path:
    """An empty temporary file in `final`'s directory, to be renamed onto `final` once written (an atomic
    write). Its mode is what a plain open() would give under the process's umask (mkstemp's is 0600,
    which the rename would carry onto the output)."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    give_default_mode(Path(name))
    return Path(name)


def give_default_mode(path: Path) -> None:
    """Set `path`'s mode to what a plain open() gives under the process's umask (0644 under umask 022):
    for files written by libraries that create them 0600 (mkstemp, safetensors)."""
    os.chmod(path, 0o666 & ~_umask())
