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

from trainer.errors import CheckpointError, read_user_text
from trainer.model.config import ModelConfig
from trainer.paths import give_default_mode

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
    give_default_mode(out_dir / WEIGHTS)  # safetensors creates its file 0600
    (out_dir / CONFIG).write_text(json.dumps({"format": FORMAT, "model": dataclasses.asdict(config)}, indent=1))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out_dir / TOKENIZER)


REQUIRED_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
"""The model fields an export's config.json must give (the rest default, as in ModelConfig.from_dict)."""


def export_model_fields(config_path: Path) -> dict:
    """The "model" object of an export's config.json, checked: JSON, this format, the REQUIRED_FIELDS as integers."""
    try:
        meta = json.loads(read_user_text(config_path, "export config"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON ({error}): write the export again with glm-ckpt "
                              f"export") from None
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(model, dict):
        raise CheckpointError(f"{config_path} is not a {FORMAT} config ({{\"format\": \"{FORMAT}\", \"model\": {{...}}}}): "
                              f"write the export again with glm-ckpt export")
    missing = [key for key in REQUIRED_FIELDS if isinstance(model.get(key), bool) or not isinstance(model.get(key), int)]
    if missing:
        raise CheckpointError(f"{config_path} lacks the model's {', '.join(missing)} (whole numbers): write the export "
                              f"again with glm-ckpt export")
    return model


def read_export(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An export directory -> (its ModelConfig, the canonical weights in fp32)."""
    if not is_export(path):
        raise CheckpointError(f"{path} is not an export: it needs {WEIGHTS} and {CONFIG} (glm-ckpt export writes them)")
    config = ModelConfig.from_dict(export_model_fields(path / CONFIG))
    return config, {name: value.float() for name, value in load_file(str(path / WEIGHTS)).items()}
