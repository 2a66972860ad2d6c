"""The run's checkpoint directory, run_dir/checkpoints/: one tag directory per checkpoint, named as DeepSpeed
names them by default (global_step{N} for optimizer step N), and `latest`, the tag of the newest complete one
(written last, atomically: trainer/engine/checkpoint.py). Plain names, no torch: glm-launch reads them too."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

LATEST = "latest"
"""checkpoints/latest: the tag of the newest complete checkpoint (written last, atomically)."""
TAG = re.compile(r"^global_step(\d+)$")
"""A checkpoint's tag directory: DeepSpeed's default name, global_step{N} for optimizer step N."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> Optional[int]:
    """The optimizer step a tag names; None for a name that is not a tag."""
    match = TAG.match(tag)
    return int(match.group(1)) if match else None


def list_tags(checkpoint_dir: Path) -> list[str]:
    """Complete checkpoint tags, newest first."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p.name for p in checkpoint_dir.iterdir() if p.is_dir() and TAG.match(p.name)]
    return sorted(tags, key=step_of, reverse=True)


def latest_tag(checkpoint_dir: Path) -> Optional[str]:
    """The tag checkpoint_dir/latest names (which may not exist: a crash or a hand edit); None without that file."""
    latest = checkpoint_dir / LATEST
    return latest.read_text(errors="replace").strip() if latest.is_file() else None


def resume_order(checkpoint_dir: Path) -> list[str]:
    """Checkpoint tags in the order a resume tries them: the one `latest` names first, then the others newest
    first. A `latest` naming a tag that is not there is passed over."""
    candidates = list_tags(checkpoint_dir)
    named = latest_tag(checkpoint_dir)
    return [named] + [t for t in candidates if t != named] if named in candidates else candidates


def resume_tag(checkpoint_dir: Path) -> Optional[str]:
    """The tag a resume starts from (before verifying it): `latest`'s, or the newest when that one is gone; None
    when there is no checkpoint."""
    return next(iter(resume_order(checkpoint_dir)), None)
