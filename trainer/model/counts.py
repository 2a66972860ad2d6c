"""`glm-train --print-model`'s closed-form counts: total and active parameters, with and without the MTP layers,
from ModelConfig alone (no module is built, so GLM-4.5's 355B cost nothing; trainer/model/summary.py compares the
closed form with a model built on the meta device)."""
from __future__ import annotations

from trainer.model.config import ModelConfig


def count_rows(config: ModelConfig, tp: int = 1) -> list[tuple[str, int]]:
    """(name, count) of the whole model's and of one token's (active) parameters, with and without MTP."""
    rows = [("total", config.num_parameters(tp)), ("active per token", config.active_parameters(tp))]
    if config.mtp_layers:
        rows += [("total without MTP", config.num_parameters(tp, mtp=False)),
                 ("active per token without MTP", config.active_parameters(tp, mtp=False))]
    return rows


def count_summary(config: ModelConfig, tp: int = 1) -> str:
    """The closed-form counts (count_rows) as glm-train --print-model prints them, one line each."""
    moe = (f"{config.num_moe_layers(mtp=False)} mixture-of-experts blocks of {config.moe_num_experts} experts "
           f"(top-{config.moe_top_k}, {config.moe_shared_experts} shared)" if config.moe_num_experts else "dense")
    mtp = f", {config.mtp_layers} MTP layer(s)" if config.mtp_layers else ""
    lines = [f"parameters (closed form, tp={tp}): {moe}{mtp}"]
    lines += [f"  {name:<36}{count:>18,}  ({count / 1e9:.3f} B)" for name, count in count_rows(config, tp)]
    return "\n".join(lines)
