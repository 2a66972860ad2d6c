"""The routed experts of a checkpoint written at parallel.ep > 1.

DeepSpeed writes a model-parallel rank's weights and (without ZeRO) its optimizer state from data-parallel rank
0 only; under expert parallelism that rank holds only the first E/ep block of every MoE layer's experts. So
beside DeepSpeed's files the trainer writes, from expert-data rank 0 of every (ep, pp, tp) coordinate
(trainer/engine/checkpoint.py):
    experts_ep_EE_mp_rank_MM.pt   {"ep": ep, "step": Adam's step, "tensors": {engine name: {"fp32": weight,
                                  "exp_avg", "exp_avg_sq"}}} for expert-parallel rank EE's block on
                                  model-parallel rank MM (pp_rank * tp + tp_rank), moments where Adam has state
A reader takes every other tensor from DeepSpeed's files and these from here: the blocks of the ep ranks
concatenated on dim 0 (the experts, in global order: rank r holds [r E/ep, (r+1) E/ep)), then the tensor
ranks merged by the layers' split rules (trainer/checkpoint/layout.py), which gives canonical tensors of all E
experts. A checkpoint at ep = 1 has no such file: DeepSpeed's own hold every expert.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from trainer.checkpoint.layout import merge_states
from trainer.errors import CheckpointError
from trainer.model.config import ModelConfig

EXPERT_FILE = re.compile(r"^experts_ep_(\d+)_mp_rank_(\d+)\.pt$")


def expert_file(tag_dir: Path, ep_rank: int, mp_rank: int) -> Path:
    return tag_dir / f"experts_ep_{ep_rank:02d}_mp_rank_{mp_rank:02d}.pt"


def checkpoint_ep(tag_dir: Path) -> int:
    """The expert-parallel size a checkpoint was written at (1: no expert files)."""
    ranks = {int(match.group(1)) for path in tag_dir.iterdir() if (match := EXPERT_FILE.match(path.name))}
    return len(ranks) or 1


def read_experts(tag_dir: Path, config: ModelConfig, tp: int, pp: int,
                 canonical_name) -> Optional[tuple[dict[str, dict[str, torch.Tensor]], int]]:
    """The expert files of a checkpoint at ep > 1 -> ({"fp32" | "exp_avg" | "exp_avg_sq": canonical state dict of
    the expert tensors (all E experts)}, Adam's step); None at ep = 1. `canonical_name(engine name, config)`
    translates the engine's names (trainer/checkpoint/pipeline_files.py)."""
    ep = checkpoint_ep(tag_dir)
    if ep == 1:
        return None
    per_tp: dict[str, list[dict[str, torch.Tensor]]] = {}
    step = 0
    for mp_rank in range(tp * pp):
        blocks: dict[str, dict[str, list[torch.Tensor]]] = {}
        for ep_rank in range(ep):
            path = expert_file(tag_dir, ep_rank, mp_rank)
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            step = int(saved["step"])
            for name, tensors in saved["tensors"].items():
                for key, value in tensors.items():
                    blocks.setdefault(key, {}).setdefault(canonical_name(name, config), []).append(value.float())
        for key, named in blocks.items():
            per_rank = per_tp.setdefault(key, [{} for _ in range(tp)])
            for name, pieces in named.items():
                per_rank[mp_rank % tp][name] = torch.cat(pieces, dim=0)  # [E, ...]: the ep blocks in rank order
    return {key: merge_states(states, config) for key, states in per_tp.items()}, step
