"""A checkpoint directory's manifest: every file's size and CRC-32, written last (after an fsync of each
file), so that a reader can tell a complete checkpoint from a torn or corrupted one. Used by the training
loop's saves and resumes and by the offline tools (convert, export, generate, eval) alike."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Optional

MANIFEST = "manifest.json"


def crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to a temporary file beside `path`, fsync it, and rename it onto `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    for path in files:
        fsync(path)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "crc32": crc32(p)} for p in files}
    write_atomic(directory / MANIFEST, json.dumps({"files": entries}, indent=1))


def _well_formed(entries: object) -> bool:
    """Whether a manifest's "files" is what write_manifest writes (a crash or a hand edit may leave valid JSON
    of another shape)."""
    return isinstance(entries, dict) and all(
        isinstance(expected, dict) and all(type(expected.get(key)) is int for key in ("size", "crc32"))
        for expected in entries.values())


def verify(directory: Path) -> Optional[str]:
    """None when every file of the checkpoint matches its manifest, else what is wrong."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest (the save did not finish)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        entries = None
    if not _well_formed(entries):
        return 'unreadable manifest (not {"files": {name: {"size": int, "crc32": int}}})'
    for name, expected in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['size']}"
        if crc32(path) != expected["crc32"]:
            return f"{name} fails its CRC-32 check"
    return None
