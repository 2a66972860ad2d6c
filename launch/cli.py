"""glm-launch: discover the devices, plan the 3D layout, start the ranks with DeepSpeed's launcher.

    glm-launch --config FILE [--nproc N | --gpus N [--gpus-per-node G] | --hostfile F [--node-rank R]]
               [--tp T] [--pp P] [--ep E] [--micro-batch M] [--recompute-interval K] [--gpu-memory 80GB]
               [--host-memory 1TB] [--master-addr ADDR] [--master-port PORT] [--max-restarts N] [--min-devices D]
               [--dry-run [--json]] [-- glm-train arguments]

The config is resolved and validated once, here, before any rank starts: the YAML, the user's `--set`s after
`--`, then the plan (parallel.tp, pp, cp, ep, micro_batch_size, recompute_interval, sequence_parallel (on wherever
tp > 1 allows it) and optim.zero_stage, offload_optimizer, offload_params, chosen whatever the YAML says (the
YAML's micro-batch is kept when it fits, and a line says so when it is not); --tp / --pp / --ep / --micro-batch /
--recompute-interval, or those keys in a `--set` after `--`, fix them instead), checked with the data, the run
directory and the disk by trainer/tools/preflight.py. It is written to run_dir/launch_config.yaml and every rank
starts with `glm-train --resolved-config` that file: all ranks read the same resolved config and validate
nothing again. A restart resolves it anew (the devices, hence the plan, may have changed).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional

from launch.devices import Cluster, discover, host_memory, local_accelerator
from launch.planner import Fixed, Plan, describe_zero, plan_layout
from launch.supervisor import RESTARTS_LOG, Start, supervise
from trainer.checkpoint.tags import resume_tag, step_of
from trainer.config import Config, config_yaml, load_config, parse_override, with_overrides
from trainer.engine.rendezvous import free_port
from trainer.errors import ConfigError, OneLineParser, exits_on_error
from trainer.paths import temporary_beside
from trainer.tools.preflight import check_outside

_LAYOUT_KEYS = {"tp": "tp", "pp": "pp", "cp": "cp", "ep": "ep", "micro_batch_size": "micro_batch",
                "recompute_interval": "recompute_interval", "sequence_parallel": "sequence_parallel"}
_ZERO_KEYS = ("zero_stage", "offload_optimizer", "offload_params")
"""The optim.* keys the planner chooses (a --set fixes them), under the same names in Fixed."""
LAUNCH_CONFIG = "launch_config.yaml"
"""The resolved config of the current start, in the run directory (shared by every node, like checkpoints/)."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """glm-launch's own arguments, and the glm-train arguments after `--`."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = OneLineParser(prog="glm-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run configuration (configs/*.yaml)")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--nproc", type=int, help="run N CPU processes (gloo) on this machine, or on each node of "
                                                   "a SLURM job, for debugging")
    devices.add_argument("--gpus", type=int, help="use N GPUs (this node), or with --dry-run plan for N GPUs anywhere")
    devices.add_argument("--hostfile", help="DeepSpeed hostfile, one 'hostname slots=N' line per node")
    parser.add_argument("--gpus-per-node", type=int, help="node size for --gpus (default: N up to 8, else 8)")
    parser.add_argument("--tp", type=int, help="fix the tensor-parallel size")
    parser.add_argument("--pp", type=int, help="fix the pipeline-parallel size")
    parser.add_argument("--ep", type=int, help="fix the expert-parallel size (a mixture-of-experts model; it divides "
                                               "dp and the expert count)")
    parser.add_argument("--micro-batch", type=int, help="fix the micro-batch size per rank")
    parser.add_argument("--recompute-interval", type=int, help="fix activation recomputation (every K blocks; 0 off)")
    parser.add_argument("--gpu-memory", help="memory per device, e.g. 80GB or 40GiB (default: measured here)")
    parser.add_argument("--host-memory", help="host memory per node for offloaded ZeRO states, e.g. 1TB (default: "
                                              "MemAvailable in this node's /proc/meminfo)")
    parser.add_argument("--node-rank", type=int, help="with --hostfile: start only the ranks of this node (the "
                                                      "hostfile's host R, from 0), without ssh; one glm-launch per node")
    parser.add_argument("--master-addr", help="address of node 0, the rendezvous (with --node-rank; under SLURM "
                                              "default: the first node)")
    parser.add_argument("--master-port", type=int, help="rendezvous port (default: a free port locally, 29500 "
                                                        "across nodes)")
    parser.add_argument("--max-restarts", type=int, default=0, help="after a rank fails or no step finishes for "
                        "train.collective_timeout_minutes, restart from the newest checkpoint up to N times")
    parser.add_argument("--min-devices", type=int, default=1, help="do not start (or restart) on fewer devices")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (what a launch prints) and exit")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON instead, every "
                                                            "rank's host, device, coordinates and blocks included")
    return parser.parse_args(argv[:split]), argv[split + 1:]


def _split_train_args(train_args: list[str]) -> tuple[list[str], list[str]]:
    """The glm-train arguments after `--` -> (their `--set` values, which glm-launch resolves into the config,
    the rest, which every rank gets as they are)."""
    parser = OneLineParser(prog="glm-launch -- (glm-train arguments)", add_help=False)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--config")
    parser.add_argument("--resolved-config")
    parser.add_argument("--restarts")
    known, rest = parser.parse_known_args(train_args)
    if known.config or known.resolved_config or known.restarts:
        raise ConfigError("give --config to glm-launch, not --config, --resolved-config or --restarts after `--`: "
                          "glm-launch resolves the config once and hands it to every rank")
    return known.overrides, rest


def _user_overrides(train_args: list[str]) -> list[str]:
    """The `--set` values among the glm-train arguments (they shape the plan too)."""
    return _split_train_args(train_args)[0]


def fixed_choices(args: argparse.Namespace, overrides: list[str]) -> Fixed:
    """What the user fixed: layout and ZeRO keys in a `--set` after `--`, then the flags (which win). The
    YAML's own layout and ZeRO keys are a recipe for running glm-train directly; glm-launch re-plans them."""
    given: dict = {}
    optim: dict = {}
    for text in overrides:
        given.update(parse_override(text).get("parallel") or {})
        optim.update(parse_override(text).get("optim") or {})
    fixed = {field: given[key] for key, field in _LAYOUT_KEYS.items() if key in given}
    fixed.update({key: optim[key] for key in _ZERO_KEYS if key in optim})
    flags = {"tp": args.tp, "pp": args.pp, "ep": args.ep, "micro_batch": args.micro_batch,
             "recompute_interval": args.recompute_interval}
    fixed.update({field: value for field, value in flags.items() if value is not None})
    return Fixed(**fixed)


def node_rank(args: argparse.Namespace, cluster: Cluster, env: dict) -> Optional[int]:
    """This node's index in the host list when glm-launch starts only this node's ranks; None when
    DeepSpeed's runner starts every node of a hostfile itself (pdsh, ssh)."""
    if args.node_rank is not None:
        return args.node_rank
    if cluster.source == "slurm":
        node_id = env.get("SLURM_NODEID", "0").strip()
        if not node_id.isdigit():
            raise ConfigError(f"SLURM_NODEID={node_id[:40]!r} is not a node index: run under SLURM's srun, or pass "
                              f"--node-rank N")
        return int(node_id)
    return None if cluster.source == "hostfile" else 0


def runner_command(plan: Plan, args: argparse.Namespace, train_args: list[str], hostfile: Optional[str],
                   env: dict, resolved_file: Path, restarts: int = 0) -> list[str]:
    """`python -m deepspeed.launcher.runner ... --module trainer.train --resolved-config FILE [--restarts N] ...`
    (the user's glm-train arguments other than `--set`, which the resolved config holds).

    One node: --num_gpus N on localhost. A hostfile: DeepSpeed reaches the nodes itself (pdsh, ssh).
    One glm-launch per node (--node-rank, or SLURM's srun): the runner with --no_ssh and this node's
    --node_rank hands DeepSpeed's per-node launcher (deepspeed.launcher.launch) the whole host list, and
    it starts only this node's ranks, so no ssh between nodes is needed."""
    cluster = plan.cluster
    node = node_rank(args, cluster, env)
    command = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if cluster.source in ("slurm", "hostfile") and node is not None:
        command += ["--hostfile", hostfile, "--no_ssh", "--node_rank", str(node),
                    "--master_addr", args.master_addr or cluster.hosts[0][0],
                    "--master_port", str(args.master_port or 29500)]
    elif cluster.source == "hostfile":
        command += ["--hostfile", hostfile, "--master_port", str(args.master_port or 29500)]
        command += ["--master_addr", args.master_addr] if args.master_addr else []
    else:
        command += ["--num_gpus", str(cluster.world_size), "--master_port", str(args.master_port or free_port())]
    # DeepSpeed's launcher logs every environment variable it sets (CUDA_VISIBLE_DEVICES even on CPU ranks) at
    # its default level, info; glm-launch prints its own plan, so its warnings and errors are what is left.
    command += ["--log_level", "warning"]
    command += ["--no_local_rank", "--module", "trainer.train", "--resolved-config", str(resolved_file.resolve())]
    return command + (["--restarts", str(restarts)] if restarts else []) + _split_train_args(train_args)[1]


def describe(plan: Plan) -> str:
    """The plan in a few human lines."""
    layout, cluster, peak = plan.layout, plan.cluster, plan.peak
    nodes = len(cluster.hosts)
    experts = f" (ep {layout.ep}: the experts split over ep, their states over edp {layout.edp})" \
        if layout.ep > 1 else ""
    return "\n".join([f"note:    {note}" for note in plan.notes] + [
        f"devices: {cluster.world_size} {cluster.kind} on {nodes} node{'s' * (nodes > 1)} ({cluster.source}), "
        f"{cluster.memory_bytes / 1e9:.1f} GB each",
        f"layout:  tp {layout.tp} x pp {layout.pp}{f' x cp {layout.cp}' if layout.cp > 1 else ''} x dp {layout.dp}"
        f"{experts}; micro-batch {layout.micro_batch} x "
        f"accumulation {layout.grad_accum} x dp = global batch {plan.global_batch}; activation recomputation "
        f"{'every %d block(s)' % layout.recompute_interval if layout.recompute_interval else 'off'}; sequence "
        f"parallelism {'on' if layout.sequence_parallel else 'off'}",
        f"blocks:  {' '.join(map(str, plan.blocks))} per stage",
        f"memory:  {peak.total / 1e9:.2f} GB estimated on stage {peak.stage} (weights {peak.weights / 1e9:.2f}, "
        f"grads {peak.gradients / 1e9:.2f}, optimizer {peak.optimizer_states / 1e9:.2f}, gathered weights "
        f"{peak.working_set / 1e9:.2f}, activations {peak.activations / 1e9:.2f}, with margin)",
        f"zero:    {describe_zero(layout)}; host memory {plan.host_per_node / 1e9:.2f} GB per node for offloaded "
        f"states, of {plan.host_memory.bytes / 1e9:.1f} GB ({plan.host_memory.source})",
    ])


def _check_local(cluster: Cluster, args: argparse.Namespace) -> None:
    """Starting ranks (not --dry-run) on --gpus needs that many GPUs here."""
    if cluster.source != "gpus":
        return
    _, count, _ = local_accelerator()
    if args.gpus > count or len(cluster.hosts) > 1:
        raise ConfigError(f"--gpus {args.gpus} asks for more GPUs than this node has ({count}): use --hostfile "
                          f"for several nodes, or --dry-run to only plan")


def _check_port_free(args: argparse.Namespace, cluster: Cluster) -> None:
    """A --master-port this node hosts (one node, or node 0) must be free: the ranks would fail to meet on it."""
    if args.master_port is None or node_rank(args, cluster, dict(os.environ)) not in (0, None) \
            or args.master_addr not in (None, "127.0.0.1", "localhost"):
        return
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store binds: a TIME_WAIT is free
        try:
            probe.bind(("", args.master_port))
        except OSError as error:
            raise ConfigError(f"--master-port {args.master_port} is in use on this machine ({error.strerror}): pick "
                              f"another port, or leave --master-port out to use a free one") from None


def _check_node(args: argparse.Namespace, cluster: Cluster) -> None:
    """--node-rank names a host of the hostfile and comes with the rendezvous address."""
    if args.node_rank is None:
        if args.master_addr is not None and cluster.source not in ("hostfile", "slurm"):
            raise ConfigError("--master-addr is for several nodes: give it with --hostfile (and --node-rank) or "
                              "under SLURM")
        return
    if cluster.source != "hostfile":
        raise ConfigError("--node-rank needs --hostfile: the hostfile lists every node, in rank order")
    if not 0 <= args.node_rank < len(cluster.hosts):
        raise ConfigError(f"--node-rank {args.node_rank} is not a node of the hostfile: it lists "
                          f"{len(cluster.hosts)} host(s), so use 0..{len(cluster.hosts) - 1}")
    if not args.master_addr:
        raise ConfigError("--node-rank needs --master-addr: the address of node 0 (the hostfile's first host), "
                          "where every node meets")


def plan_devices(args: argparse.Namespace, overrides: list[str], restarting: bool = False) -> tuple[Config, Plan]:
    """Discover the devices and plan the layout for them: at the start, and again before each restart. Returns
    the config with the plan applied, validated at the world size found (the plan named when it fails); the
    files it names are checked by plan_start."""
    # the YAML's tp, pp, cp and ep are re-planned like its other layout keys: check the rest (a ZeRO stage fixed
    # by a --set among them) at tp = pp = cp = ep = 1, unless the user fixes them; the planner needs that much to
    # plan. Sequence parallelism needs tp > 1: the plan turns it on with tp (a --set of it is a choice the plan
    # keeps)
    config = load_config(args.config, ["parallel.tp=1", "parallel.pp=1", "parallel.cp=1", "parallel.ep=1"]
                         + overrides + ["parallel.sequence_parallel=false"])
    config.validate()
    cluster = discover(hostfile=args.hostfile, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                       nproc=args.nproc, gpu_memory=args.gpu_memory)
    _check_node(args, cluster)
    if cluster.world_size < args.min_devices:
        raise ConfigError(f"{cluster.world_size} device(s) found, fewer than --min-devices {args.min_devices}: "
                          f"{'no restart' if restarting else 'nothing started'}")
    plan = plan_layout(config, cluster, host_memory(args.host_memory), fixed_choices(args, overrides))
    resolved = with_overrides(config, plan.overrides())  # the plan sets every key the tp = pp = 1 above did
    try:
        resolved.validate(cluster.world_size)
    except ConfigError as error:  # a constraint the planner does not know: name what it chose
        layout = plan.layout
        raise ConfigError(f"the plan tp {layout.tp} x pp {layout.pp} x cp {layout.cp} x dp {layout.dp} (ep {layout.ep}), "
                          f"micro-batch "
                          f"{layout.micro_batch} fails a check ({error}): fix the layout with --tp / --pp / "
                          f"--micro-batch, or change the config") from None
    return resolved, plan


def prepare(argv: list[str]) -> tuple[argparse.Namespace, list[str], Config, Plan]:
    """Parse, discover and plan: the config returned has the plan applied; plan_start() checks it (preflight)
    before the first start, --dry-run only against the layout (the data and the run directory may be on the
    cluster, not here)."""
    args, train_args = parse_args(argv)
    if args.json and not args.dry_run:
        raise ConfigError("--json prints the plan of a --dry-run: add --dry-run")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise ConfigError(f"--master-port {args.master_port} is not a TCP port: use 1..65535 (1024 and up "
                          f"without root)")
    for flag, value, least in (("--tp", args.tp, 1), ("--pp", args.pp, 1), ("--ep", args.ep, 1),
                               ("--micro-batch", args.micro_batch, 1),
                               ("--recompute-interval", args.recompute_interval, 0), ("--gpus", args.gpus, 1),
                               ("--gpus-per-node", args.gpus_per_node, 1), ("--node-rank", args.node_rank, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}: leave it out to let the planner choose")
    if args.max_restarts < 0 or args.min_devices < 1:
        raise ConfigError(f"--max-restarts must be >= 0 and --min-devices >= 1, got {args.max_restarts} and "
                          f"{args.min_devices}")
    resolved, plan = plan_devices(args, _user_overrides(train_args))
    if args.dry_run:
        resolved.validate(plan.cluster.world_size)
    else:
        _check_local(plan.cluster, args)
        _check_port_free(args, plan.cluster)
    return args, train_args, resolved, plan


def resumable_step(run_dir: Path) -> Optional[int]:
    """The step of the checkpoint a resume starts from (the one `checkpoints/latest` names, written only once
    that checkpoint is complete, or the newest when it is gone); None without one."""
    tag = resume_tag(run_dir / "checkpoints")
    return None if tag is None else step_of(tag)


def plan_start(args: argparse.Namespace, train_args: list[str], scratch: str, restarts: int,
               first: tuple[Config, Plan]) -> Start:
    """One start of the ranks: the first on prepare()'s plan (`first`), a restart on the devices found now,
    resuming from the newest checkpoint (when there is one) and telling the ranks how many restarts came before
    (`restarts` in metrics.jsonl). The start's config is checked here, once (preflight), and written to
    run_dir/LAUNCH_CONFIG for the ranks."""
    planned, plan = first
    if restarts:  # the run dir holds this job's own failed start: continue it, or start over it if it saved nothing
        planned, plan = plan_devices(args, _user_overrides(train_args), restarting=True)
        own = ["train.resume=true", "train.overwrite=false"] if resumable_step(Path(planned.train.run_dir)) \
            is not None else ["train.resume=false", "train.overwrite=true"]
        planned = with_overrides(planned, own)
    resolved = check_outside(planned, plan.cluster.world_size)  # plan_devices validated it
    run_dir = Path(resolved.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    staged = temporary_beside(run_dir / LAUNCH_CONFIG)  # one per node: SLURM's nodes may write it at once
    staged.write_text(config_yaml(resolved))
    os.replace(staged, run_dir / LAUNCH_CONFIG)
    env = dict(os.environ)
    if plan.cluster.kind == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    hostfile = args.hostfile
    if plan.cluster.source == "slurm":  # the same hostfile on every node, from SLURM's node list
        hostfile = os.path.join(scratch, "hostfile")
        Path(hostfile).write_text("".join(f"{host} slots={slots}\n" for host, slots in plan.cluster.hosts))
    node = node_rank(args, plan.cluster, env)
    if node == 0 and not restarts and not resolved.train.resume:  # a new run: metrics.jsonl is rewritten too
        (run_dir / RESTARTS_LOG).unlink(missing_ok=True)
    if node in (None, 0):  # once per job, not once per node
        print(describe(plan), flush=True)
    layout = plan.layout
    return Start(runner_command(plan, args, train_args, hostfile, env, run_dir / LAUNCH_CONFIG, restarts), env,
                 local_ranks=0 if node is None else plan.cluster.hosts[node][1],
                 metrics=run_dir / "metrics.jsonl" if node == 0 else None,
                 stall_seconds=resolved.train.collective_timeout_minutes * 60,
                 summary={"world_size": plan.cluster.world_size,
                          "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}})


@exits_on_error
def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, train_args, resolved, plan = prepare(argv)
    if args.dry_run:
        print(json.dumps(plan.to_dict(), indent=1) if args.json else describe(plan))
        return 0
    run_dir = Path(resolved.train.run_dir)
    with tempfile.TemporaryDirectory(prefix="glm-launch-") as scratch:
        return supervise(lambda restarts: plan_start(args, train_args, scratch, restarts, (resolved, plan)),
                         lambda: resumable_step(run_dir), args.max_restarts, run_dir)


if __name__ == "__main__":
    sys.exit(main())
