"""Where an output may go: the checks every command makes before it writes anything."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional


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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
