"""glm-launch: discover the devices, plan the 3D layout, start the ranks with DeepSpeed's launcher.

    glm-launch --config FILE [--nproc N | --gpus N [--gpus-per-node G] | --hostfile F]
               [--tp T] [--pp P] [--micro-batch M] [--checkpoint-interval K] [--gpu-memory 80GB]
               [--master-port PORT] [--dry-run] [-- glm-train arguments]

The plan reaches every rank as glm-train `--set parallel.*` overrides after the user's own, so all
ranks read the same resolved layout. The planner chooses parallel.tp, pp, micro_batch_size and
activation_checkpoint_interval whatever the YAML says; --tp / --pp / --micro-batch /
--checkpoint-interval, or those keys in a `--set` after `--`, fix them instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from launch.devices import Cluster, discover, local_accelerator
from launch.planner import Fixed, Plan, plan_layout
from trainer.config import Config, load_config, parse_override
from trainer.engine.rendezvous import free_port
from trainer.errors import ConfigError, OneLineParser, exits_on_error

_LAYOUT_KEYS = {"tp": "tp", "pp": "pp", "micro_batch_size": "micro_batch",
                "activation_checkpoint_interval": "checkpoint_interval"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """glm-launch's own arguments, and the glm-train arguments after `--`."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = OneLineParser(prog="glm-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run configuration (configs/*.yaml)")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--nproc", type=int, help="run N CPU processes (gloo) on this machine, for debugging")
    devices.add_argument("--gpus", type=int, help="use N GPUs (this node), or with --dry-run plan for N GPUs anywhere")
    devices.add_argument("--hostfile", help="DeepSpeed hostfile, one 'hostname slots=N' line per node")
    parser.add_argument("--gpus-per-node", type=int, help="node size for --gpus (default: N up to 8, else 8)")
    parser.add_argument("--tp", type=int, help="fix the tensor-parallel size")
    parser.add_argument("--pp", type=int, help="fix the pipeline-parallel size")
    parser.add_argument("--micro-batch", type=int, help="fix the micro-batch size per rank")
    parser.add_argument("--checkpoint-interval", type=int, help="fix activation checkpointing (every K blocks; 0 off)")
    parser.add_argument("--gpu-memory", help="memory per device, e.g. 80GB or 40GiB (default: measured here)")
    parser.add_argument("--master-port", type=int, help="rendezvous port (default: a free port locally, 29500 "
                                                        "across nodes)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan as JSON and exit")
    return parser.parse_args(argv[:split]), argv[split + 1:]


def _user_overrides(train_args: list[str]) -> list[str]:
    """The `--set` values among the glm-train arguments (they shape the plan too)."""
    parser = OneLineParser(prog="glm-launch -- (glm-train arguments)", add_help=False)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--config")
    known, _ = parser.parse_known_args(train_args)
    if known.config:
        raise ConfigError("give --config to glm-launch, not after `--`: glm-launch passes it to every rank")
    return known.overrides


def fixed_choices(args: argparse.Namespace, overrides: list[str]) -> Fixed:
    """What the user fixed: layout keys in a `--set` after `--`, then the flags (which win). The
    YAML's own layout keys are a recipe for running glm-train directly; glm-launch re-plans them."""
    given: dict = {}
    for text in overrides:
        given.update(parse_override(text).get("parallel") or {})
    fixed = {field: given[key] for key, field in _LAYOUT_KEYS.items() if key in given}
    flags = {"tp": args.tp, "pp": args.pp, "micro_batch": args.micro_batch,
             "checkpoint_interval": args.checkpoint_interval}
    fixed.update({field: value for field, value in flags.items() if value is not None})
    return Fixed(**fixed)


def runner_command(plan: Plan, args: argparse.Namespace, train_args: list[str], hostfile: Optional[str],
                   env: dict) -> list[str]:
    """`python -m deepspeed.launcher.runner ... --module trainer.train --config FILE ... --set layout`.

    One node: --num_gpus N on localhost. A hostfile: DeepSpeed reaches the nodes itself (pdsh, ssh).
    SLURM (glm-launch started once per node by srun): each node runs the runner with --no_ssh and
    its --node_rank, so no ssh between nodes is needed."""
    cluster = plan.cluster
    command = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if cluster.source == "slurm":
        command += ["--hostfile", hostfile, "--no_ssh", "--node_rank", env.get("SLURM_NODEID", "0"),
                    "--master_addr", cluster.hosts[0][0], "--master_port", str(args.master_port or 29500)]
    elif cluster.source == "hostfile":
        command += ["--hostfile", hostfile, "--master_port", str(args.master_port or 29500)]
    else:
        command += ["--num_gpus", str(cluster.world_size), "--master_port", str(args.master_port or free_port())]
    command += ["--no_local_rank", "--module", "trainer.train", "--config", str(Path(args.config).resolve())]
    return command + train_args + [arg for value in plan.overrides() for arg in ("--set", value)]


def describe(plan: Plan) -> str:
    """The plan in a few human lines."""
    layout, cluster, peak = plan.layout, plan.cluster, plan.peak
    nodes = len(cluster.hosts)
    return "\n".join([
        f"devices: {cluster.world_size} {cluster.kind} on {nodes} node{'s' * (nodes > 1)} ({cluster.source}), "
        f"{cluster.memory_bytes / 1e9:.1f} GB each",
        f"layout:  tp {layout.tp} x pp {layout.pp} x dp {layout.dp}; micro-batch {layout.micro_batch} x "
        f"accumulation {layout.grad_accum} x dp = global batch {plan.global_batch}; activation checkpointing "
        f"{'every %d block(s)' % layout.checkpoint_interval if layout.checkpoint_interval else 'off'}",
        f"blocks:  {' '.join(map(str, plan.blocks))} per stage",
        f"memory:  {peak.total / 1e9:.2f} GB estimated on stage {peak.stage} (weights {peak.weights / 1e9:.2f}, "
        f"grads {peak.gradients / 1e9:.2f}, optimizer {peak.optimizer_states / 1e9:.2f}, activations "
        f"{peak.activations / 1e9:.2f}, with margin)",
    ])


def _check_local(cluster: Cluster, args: argparse.Namespace) -> None:
    """Starting ranks (not --dry-run) on --gpus needs that many GPUs here."""
    if cluster.source != "gpus":
        return
    _, count, _ = local_accelerator()
    if args.gpus > count or len(cluster.hosts) > 1:
        raise ConfigError(f"--gpus {args.gpus} asks for more GPUs than this node has ({count}): use --hostfile "
                          f"for several nodes, or --dry-run to only plan")


def prepare(argv: list[str]) -> tuple[argparse.Namespace, list[str], Config, Plan]:
    """Parse, discover, plan and validate: everything that must succeed before a process starts."""
    args, train_args = parse_args(argv)
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise ConfigError(f"--master-port {args.master_port} is not a TCP port: use 1..65535 (1024 and up "
                          f"without root)")
    overrides = _user_overrides(train_args)
    config = load_config(args.config, overrides)
    config.validate()
    cluster = discover(hostfile=args.hostfile, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                       nproc=args.nproc, gpu_memory=args.gpu_memory)
    plan = plan_layout(config, cluster, fixed_choices(args, overrides))
    resolved = load_config(args.config, overrides + plan.overrides())
    resolved.validate(cluster.world_size)
    if not args.dry_run:
        _check_local(cluster, args)
    return args, train_args, resolved, plan


def launch(plan: Plan, args: argparse.Namespace, train_args: list[str]) -> int:
    """Start the ranks through DeepSpeed's runner and return its exit status."""
    env = dict(os.environ)
    if plan.cluster.kind == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    hostfile = args.hostfile
    with tempfile.TemporaryDirectory(prefix="glm-launch-") as scratch:
        if plan.cluster.source == "slurm":  # the same hostfile on every node, from SLURM's node list
            hostfile = os.path.join(scratch, "hostfile")
            Path(hostfile).write_text("".join(f"{host} slots={slots}\n" for host, slots in plan.cluster.hosts))
        command = runner_command(plan, args, train_args, hostfile, env)
        print(f"starting: {' '.join(command)}", flush=True)
        return subprocess.call(command, env=env)


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, train_args, _, plan = prepare(argv)
    if args.dry_run:
        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    if os.environ.get("SLURM_NODEID", "0") == "0":
        print(describe(plan), flush=True)
    return launch(plan, args, train_args)


if __name__ == "__main__":
    sys.exit(main())
