"""The GLM transformer on the tensor-parallel layers of trainer.parallel.

The pieces are imported lazily, so that `trainer.model.config` (read by `trainer.config`) does not pull in
torch, the parallel layers and the data package.
"""
from __future__ import annotations

import importlib
from typing import Any

_PIECES = {"GLMEmbedding": "trainer.model.embedding", "GLMBlock": "trainer.model.block",
           "FinalLayerNorm": "trainer.model.glm", "GLMLoss": "trainer.model.glm", "GLMModel": "trainer.model.glm"}

__all__ = list(_PIECES)


def __getattr__(name: str) -> Any:
    if name not in _PIECES:
        raise AttributeError(f"module 'trainer.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_PIECES[name]), name)
