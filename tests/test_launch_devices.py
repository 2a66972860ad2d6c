"""Device discovery: hostfiles, SLURM node lists, --gpus / --nproc, memory sizes."""
from __future__ import annotations

import pytest

from launch import devices
from launch.devices import discover, expand_nodelist, parse_hostfile, parse_memory
from trainer.errors import ConfigError


def test_parse_memory_decimal_and_binary_units():
    assert parse_memory("80GB") == 80 * 10 ** 9
    assert parse_memory("40GiB") == 40 * 2 ** 30
    assert parse_memory("24000MB") == 24 * 10 ** 9
    assert parse_memory("1.5 TB") == 15 * 10 ** 11
    with pytest.raises(ConfigError, match="is not a size"):
        parse_memory("lots")


def test_hostfile_parsed_in_order(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\nworker-1 slots=8\n\nworker-0 slots=4  # a smaller one\n")
    assert parse_hostfile(path) == (("worker-1", 8), ("worker-0", 4))


@pytest.mark.parametrize("text, message", [
    ("worker-0 8\n", "is not 'hostname slots=N'"),
    ("worker-0 slots=0\n", "is not 'hostname slots=N'"),
    ("a slots=8\na slots=8\n", "names host a twice"),
    ("# nothing\n", "lists no hosts"),
])
def test_bad_hostfiles(tmp_path, text, message):
    path = tmp_path / "hostfile"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_hostfile(path)


def test_missing_hostfile(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_hostfile(tmp_path / "nope")


def test_slurm_nodelist_expansion():
    assert expand_nodelist("gpu[01-03,07],login") == ["gpu01", "gpu02", "gpu03", "gpu07", "login"]
    assert expand_nodelist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand_nodelist("single") == ["single"]


def test_slurm_environment_is_a_cluster():
    env = {"SLURM_JOB_NODELIST": "node[1-3]", "SLURM_GPUS_PER_NODE": "a100:8"}
    cluster = discover(gpu_memory="40GB", env=env)
    assert cluster.source == "slurm"
    assert cluster.hosts == (("node1", 8), ("node2", 8), ("node3", 8))
    assert cluster.world_size == 24 and cluster.memory_bytes == 40 * 10 ** 9


def test_gpus_make_nodes_of_eight():
    cluster = discover(gpus=768, gpu_memory="40GB", env={})
    assert len(cluster.hosts) == 96 and cluster.devices_per_node == 8
    assert discover(gpus=4, gpu_memory="40GB", env={}).hosts == (("node0", 4),)
    assert discover(gpus=12, gpus_per_node=4, gpu_memory="40GB", env={}).devices_per_node == 4
    with pytest.raises(ConfigError, match="not a whole number of nodes"):
        discover(gpus=12, gpu_memory="40GB", env={})


def test_rank_devices_in_launcher_order(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("a slots=2\nb slots=2\n")
    cluster = discover(hostfile=str(path), gpu_memory="80GB", env={})
    assert cluster.rank_devices() == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]


def test_nproc_splits_host_memory():
    cluster = discover(nproc=2, env={})
    assert cluster.kind == "cpu" and cluster.world_size == 2 and cluster.memory_bytes > 0


def test_only_one_source():
    with pytest.raises(ConfigError, match="only one of"):
        discover(nproc=2, gpus=2, env={})


def test_nproc_in_a_slurm_job_means_n_cpu_processes_on_every_node():
    cluster = discover(nproc=2, env={"SLURM_JOB_NODELIST": "n[1-2]"})
    assert (cluster.hosts, cluster.kind, cluster.source) == ((("n1", 2), ("n2", 2)), "cpu", "slurm")


def test_a_hostfile_on_a_cpu_node_means_a_cpu_process_per_slot(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "local_accelerator", lambda: ("cpu", 0, 0))  # DeepSpeed's accelerator: the CPU
    path = tmp_path / "hostfile"
    path.write_text("a slots=2\nb slots=1\n")
    cluster = discover(hostfile=str(path), env={})
    assert (cluster.kind, cluster.world_size, cluster.source) == ("cpu", 3, "hostfile")
    assert cluster.memory_bytes > 0
