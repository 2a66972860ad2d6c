"""The memory model (launch/memory.py) beside the peak memory a device check measured.

    python -m launch.device_memory DIR/device_check.json

`glm-bench --device-check` (trainer/bench/device_check.py) measures the engine's peak allocated memory at two
micro-batch sizes; trainer/ does not import launch/, so the estimate is added here, from the config file and
overrides the report names: each engine entry gains `memory_model_bytes` (launch/memory.py's total for one device
at that micro-batch size, dp = 1, two micro-batches a step) and `measured_over_model`. The file is rewritten in
place and the comparison printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from launch.memory import Layout, Workload, stage_memory
from trainer.config import Config, load_config
from trainer.errors import ConfigError, OneLineParser, exits_on_error


def estimate_bytes(config: Config, micro_batch: int, on_cpu: bool) -> int:
    """launch/memory.py's total for the one device of the device check's engine at this micro-batch size."""
    p, o = config.parallel, config.optim
    layout = Layout(1, 1, 1, micro_batch, 2, p.recompute_interval, o.zero_stage, o.offload_optimizer, o.offload_params)
    return stage_memory(Workload.from_config(config, on_cpu=on_cpu), layout, 0, config.model.num_layers).total


def add_estimates(report: dict) -> dict:
    config = load_config(report["config"], report["overrides"])
    for entry in report["engine"]:
        if "out_of_memory" in entry:
            entry["memory_model_bytes"] = estimate_bytes(config, entry["micro_batch_size"], report["device"] == "cpu")
            continue
        model = estimate_bytes(config, entry["micro_batch_size"], report["device"] == "cpu")
        entry["memory_model_bytes"] = model
        entry["measured_over_model"] = entry["peak_memory_bytes"] / model
    return report


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    parser = OneLineParser(prog="python -m launch.device_memory", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="device_check.json written by glm-bench --device-check")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {args.report} ({error}): pass the device_check.json that glm-bench "
                          f"--device-check --out DIR wrote") from None
    report = add_estimates(report)
    args.report.write_text(json.dumps(report, indent=2))
    for entry in report["engine"]:
        if "out_of_memory" in entry:
            print(f"micro-batch {entry['micro_batch_size']}: out of memory, memory model "
                  f"{entry['memory_model_bytes'] / 2 ** 30:.2f} GiB")
            continue
        print(f"micro-batch {entry['micro_batch_size']}: measured {entry['peak_memory_bytes'] / 2 ** 30:.2f} GiB, "
              f"memory model {entry['memory_model_bytes'] / 2 ** 30:.2f} GiB "
              f"(measured / model {entry['measured_over_model']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
