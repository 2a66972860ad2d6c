"""glm-ckpt export: one safetensors file with the canonical weights, the model config as JSON and the
tokenizer, loadable on one device without DeepSpeed or the training config.

    OUT/model.safetensors   canonical state dict (GLMModel names, full tensors, unpadded vocabulary)
    OUT/config.json         {"format": "glm-export", "model": ModelConfig fields}
    OUT/tokenizer.json      the run's tokenizer (when given)
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
FORMAT = "glm-export"


def is_export(path: Path) -> bool:
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def write_export(weights: dict[str, torch.Tensor], config: ModelConfig, out_dir: Path,
                 tokenizer: Optional[Path] = None, dtype: torch.dtype = torch.float32) -> None:
    """Write the canonical weights (cast to dtype), the config and the tokenizer to out_dir."""
    if tokenizer is not None and not tokenizer.is_file():
        raise CheckpointError(f"tokenizer {tokenizer} does not exist: pass the tokenizer.json the run used")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: value.to(dtype).contiguous() for name, value in weights.items()}, str(out_dir / WEIGHTS),
              metadata={"format": FORMAT})
    (out_dir / CONFIG).write_text(json.dumps({"format": FORMAT, "model": dataclasses.asdict(config)}, indent=1))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out_dir / TOKENIZER)


def read_export(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An export directory -> (its ModelConfig, the canonical weights in fp32)."""
    if not is_export(path):
        raise CheckpointError(f"{path} is not an export: it needs {WEIGHTS} and {CONFIG} (glm-ckpt export writes them)")
    meta = json.loads((path / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / CONFIG} is not a {FORMAT} config")
    config = ModelConfig.from_dict(meta["model"])
    return config, {name: value.float() for name, value in load_file(str(path / WEIGHTS)).items()}
