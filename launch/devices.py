"""Device discovery: which hosts, how many devices on each, how much memory per device.

Sources, first match wins: a DeepSpeed hostfile (`host slots=N` per line), `--gpus N` (a cluster
that need not be this machine), `--nproc N` (CPU processes on gloo: on this machine, or on every node
of a SLURM allocation), SLURM's environment, and last the accelerators of this node through
DeepSpeed's accelerator abstraction. A hostfile's slots are processes of this node's accelerator, as
DeepSpeed's launcher reads them: on a node whose accelerator is the CPU, CPU processes on gloo.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from trainer.errors import ConfigError, read_user_text

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10 ** 3, "KB": 10 ** 3, "M": 10 ** 6, "MB": 10 ** 6, "G": 10 ** 9, "GB": 10 ** 9,
          "T": 10 ** 12, "TB": 10 ** 12, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


@dataclass(frozen=True)
class Cluster:
    """The devices to plan for: hosts in rank order with their device count, and the memory of the
    smallest device (every rank must fit on it)."""

    hosts: tuple[tuple[str, int], ...]
    memory_bytes: int
    kind: str
    """'cpu' (gloo processes) or the accelerator's name ('cuda', ...)."""
    source: str
    """Where the devices came from: hostfile, gpus, nproc, slurm or local."""

    @property
    def world_size(self) -> int:
        return sum(slots for _, slots in self.hosts)

    @property
    def devices_per_node(self) -> int:
        """The smallest host's device count: the bound on tensor parallelism."""
        return min(slots for _, slots in self.hosts)

    def rank_devices(self) -> list[tuple[str, int]]:
        """(host, local device index) of every global rank, in DeepSpeed's launcher order."""
        return [(host, device) for host, slots in self.hosts for device in range(slots)]

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "world_size": self.world_size,
                "hosts": [{"host": host, "slots": slots} for host, slots in self.hosts],
                "memory_per_device_gb": round(self.memory_bytes / 1e9, 2)}


def parse_memory(text: str, flag: str = "--gpu-memory") -> int:
    """'80GB' -> 80e9 bytes, '40GiB' -> 40 * 2^30 bytes (GB, MB... are decimal; GiB, MiB... binary)."""
    match = _MEMORY.match(text)
    if not match:
        raise ConfigError(f"{flag} {text!r} is not a size: write it like 80GB, 40GiB or 24000MB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    return int(number * _UNITS[unit])


@dataclass(frozen=True)
class HostMemory:
    """Host memory of one node for offloaded ZeRO states, and where the figure came from."""

    bytes: int
    source: str

    def to_dict(self) -> dict:
        return {"capacity_gb": round(self.bytes / 1e9, 2), "source": self.source}


def host_memory(text: Optional[str]) -> HostMemory:
    """--host-memory when given, else MemAvailable of /proc/meminfo on this (the launching) node."""
    if text:
        return HostMemory(parse_memory(text, "--host-memory"), "--host-memory")
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return HostMemory(int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo of this node")
    raise ConfigError("the host memory is unknown (no MemAvailable in /proc/meminfo): pass --host-memory, "
                      "e.g. --host-memory 1TB")


def parse_hostfile(path: str | Path) -> tuple[tuple[str, int], ...]:
    """Read a DeepSpeed hostfile: one `hostname slots=N` per line, `#` comments and blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hostfile {path} does not exist: write one line 'hostname slots=N' per node "
                          f"(see configs/cluster/hostfile.example)")
    hosts: dict[str, int] = {}
    for number, line in enumerate(read_user_text(path, "hostfile").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not match or int(match.group(2)) < 1:
            raise ConfigError(f"hostfile {path} line {number} {line!r} is not 'hostname slots=N' with N >= 1")
        if match.group(1) in hosts:
            raise ConfigError(f"hostfile {path} names host {match.group(1)} twice: give each node one line")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise ConfigError(f"hostfile {path} lists no hosts: write one line 'hostname slots=N' per node")
    return tuple(hosts.items())


MAX_SLURM_NODES = 100_000
"""A SLURM range longer than this is not a node list (the largest machines have tens of thousands of nodes)."""


def _split_top_level(text: str) -> list[str]:
    """Split a SLURM node list on the commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current] if current else parts


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list to host names: 'gpu[01-03,07],login' -> gpu01 gpu02 gpu03 gpu07 login.
    Zero padding of a range is kept; several bracket groups in one name expand as a product."""
    hosts: list[str] = []
    for part in _split_top_level(text.strip()):
        match = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, rest = match.groups()
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            if not re.fullmatch(r"\d+", low) or not re.fullmatch(r"\d*", high) \
                    or int(high or low) - int(low) > MAX_SLURM_NODES:
                raise ConfigError(f"SLURM node list {text[:80]!r} has the range [{item[:20]}], not 'low-high' of at most "
                                  f"{MAX_SLURM_NODES} nodes: run under SLURM's own srun/sbatch, or pass --hostfile")
            width = len(low)
            for number in range(int(low), int(high or low) + 1):
                hosts.extend(expand_nodelist(f"{prefix}{number:0{width}d}{rest}"))
    return hosts


def _slurm_gpus_per_node(env: Mapping[str, str]) -> Optional[int]:
    """GPUs per node from SLURM_GPUS_ON_NODE, or SLURM_GPUS_PER_NODE ('8' or 'a100:8')."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(name):
            count = env[name].split("(")[0].split(":")[-1].strip()
            if not count.isdigit():
                raise ConfigError(f"{name}={env[name][:40]!r} is not a GPU count ('8' or 'a100:8'): run under "
                                  f"SLURM's own srun/sbatch, or pass --gpus N")
            return int(count)
    return None


def local_accelerator() -> tuple[str, int, int]:
    """(name, device count, smallest device memory) of this node, through DeepSpeed's accelerator."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return "cpu", 0, 0
    count = accelerator.device_count()
    memory = min(accelerator.total_memory(index) for index in range(count)) if count else 0
    return accelerator.device_name(), count, memory


def _host_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def discover(*, hostfile: Optional[str] = None, gpus: Optional[int] = None, gpus_per_node: Optional[int] = None,
             nproc: Optional[int] = None, gpu_memory: Optional[str] = None,
             env: Mapping[str, str] = os.environ) -> Cluster:
    """The cluster to plan for, from the first source given (see the module docstring).

    Device memory: --gpu-memory when given; for CPU processes the host memory split evenly; else
    the smallest accelerator of this node (a hostfile or SLURM job is taken to be homogeneous)."""
    if sum(x is not None for x in (hostfile, gpus, nproc)) > 1:
        raise ConfigError("give only one of --hostfile, --gpus and --nproc")
    memory = parse_memory(gpu_memory) if gpu_memory else None
    slurm_nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nproc is not None:
        if nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {nproc}")
        names, source = (expand_nodelist(slurm_nodes), "slurm") if slurm_nodes else (["localhost"], "nproc")
        return Cluster(tuple((host, nproc) for host in names), memory or _host_memory() // nproc, "cpu", source)

    if hostfile is not None:
        hosts, source = parse_hostfile(hostfile), "hostfile"
    elif gpus is not None:
        hosts, source = _hosts_for_gpus(gpus, gpus_per_node), "gpus"
    elif slurm_nodes:
        hosts, source = None, "slurm"
    else:
        hosts, source = None, "local"

    if hosts is not None and memory is not None:  # planning for other machines: nothing to ask this one
        return Cluster(hosts, memory, "gpu", source)
    name, count, local_memory = local_accelerator()
    if source == "hostfile" and name == "cpu":  # DeepSpeed's launcher starts one CPU process per slot
        return Cluster(hosts, _host_memory() // max(slots for _, slots in hosts), "cpu", source)
    if hosts is None:
        per_node = (_slurm_gpus_per_node(env) if source == "slurm" else None) or count
        if per_node == 0:
            raise ConfigError("no GPU found on this machine: pass --nproc N to run N CPU processes (gloo) here or on "
                              "each node of a SLURM job, or "
                              "--gpus N / --hostfile F with --dry-run to plan for other machines")
        names = expand_nodelist(slurm_nodes) if source == "slurm" else ["localhost"]
        hosts = tuple((host, per_node) for host in names)
    if memory is None:
        if count == 0:
            raise ConfigError("the device memory is unknown (no GPU on this machine): pass --gpu-memory, "
                              "e.g. --gpu-memory 80GB")
        memory = local_memory
    return Cluster(hosts, memory, name if count else "gpu", source)


def _hosts_for_gpus(gpus: int, gpus_per_node: Optional[int]) -> tuple[tuple[str, int], ...]:
    """`--gpus N`: one node when N <= 8, otherwise nodes of 8 (or of --gpus-per-node)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    per_node = gpus_per_node or min(gpus, 8)
    if gpus % per_node:
        raise ConfigError(f"--gpus {gpus} is not a whole number of nodes of {per_node} GPUs: "
                          f"pass --gpus-per-node to say how many GPUs each node has")
    return tuple((f"node{index}", per_node) for index in range(gpus // per_node))
