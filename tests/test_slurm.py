"""SLURM helpers with known answers: host lists, sinfo against planned requests, the status
command check, and a multi-node training job's launch derived from SLURM's environment."""

from __future__ import annotations

import argparse

import pytest

from medmax_pipeline.core.slurm import (
    JobRequest,
    Node,
    SlurmError,
    default_partition,
    expand_hostlist,
    filesystem_of,
    gpus_in_gres,
    min_job_age_seconds,
    node_local_paths,
    parse_mounts,
    parse_scontrol_config,
    parse_sinfo_nodes,
    requests_that_do_not_fit,
    status_command_problem,
)
from medmax_pipeline.stages.train import multinode
from medmax_pipeline.stages.train.multinode import node_launch, rendezvous_port, torchrun_command

# ----------------------------------------------------------------------------------------------
# Host lists
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("vm", ["vm"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("a[1-2]-ib,b[009-010]", ["a1-ib", "a2-ib", "b009", "b010"]),
        ("rack[1-2]n[1-2]", ["rack1n1", "rack1n2", "rack2n1", "rack2n2"]),
        ("127.0.0.1,localhost", ["127.0.0.1", "localhost"]),
    ],
)
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu]1[", "gpu[a-b]", "gpu[5-3]", ""])
def test_expand_hostlist_refuses_malformed_lists(bad: str) -> None:
    with pytest.raises(SlurmError, match="host list"):
        expand_hostlist(bad)


# ----------------------------------------------------------------------------------------------
# sinfo against the plan
# ----------------------------------------------------------------------------------------------

# `sinfo -h -N -o '%N %P %c %m %G'` of the single-node CI cluster (.ci/slurm-up.sh) and of a
# cluster with two kinds of GPU node.
SINFO_CI = "vm cpu* 2 22899 (null)\nvm gpu 2 22899 (null)\n"
SINFO_GPU = """\
cpu001 cpu* 64 257000 (null)
cpu002 cpu* 64 257000 (null)
gpu01 gpu 32 500000 gpu:a100:8(S:0-1)
gpu02 gpu 32 500000 gpu:a100:8(S:0-1)
gpu03 gpu 16 250000 gpu:4,tmpdisk:100
"""


def test_gres_gpu_counts() -> None:
    assert [gpus_in_gres(g) for g in ("(null)", "gpu:4", "gpu:a100:8(S:0-1)", "gpu:2,tmpdisk:100", "tmpdisk:100", "gpu:a100")] == [0, 4, 8, 2, 0, 1]


def test_parse_sinfo_nodes() -> None:
    nodes = parse_sinfo_nodes(SINFO_GPU)
    assert nodes[0] == Node("cpu001", "cpu", 64, 257000, 0)
    assert nodes[2] == Node("gpu01", "gpu", 32, 500000, 8)
    assert nodes[4] == Node("gpu03", "gpu", 16, 250000, 4)
    assert default_partition(SINFO_GPU) == "cpu" and default_partition(SINFO_CI) == "cpu"
    with pytest.raises(SlurmError, match="sinfo line 2"):
        parse_sinfo_nodes("vm cpu* 2 22899 (null)\nvm gpu two 22899 (null)\n")


def request(rule: str, partition: str | None = None, cpus: int = 1, mem: int = 1000, gpus: int = 0, nodes: int = 1) -> JobRequest:
    return JobRequest(rule, partition=partition, cpus_per_task=cpus, mem_mb=mem, gpus_per_node=gpus, nodes=nodes)


def test_requests_that_fit_pass() -> None:
    nodes = parse_sinfo_nodes(SINFO_CI)
    plan = [request("demo"), request("tokenize_shard", "cpu", cpus=2, mem=2000), request("train", "gpu", cpus=2, mem=22899)]
    assert requests_that_do_not_fit(plan, nodes, "cpu") == []


def test_more_cpus_than_any_node_is_refused_naming_rule_request_and_node() -> None:
    """The issue's case: tokenize asks --cpus-per-task 8 (the workers of the GPU overlay) on a 2-CPU node."""
    problems = requests_that_do_not_fit([request("tokenize_shard", "gpu", cpus=8, mem=16000)] * 2, parse_sinfo_nodes(SINFO_CI), "cpu")
    assert problems == [
        "rule tokenize_shard asks for 8 CPU(s), 16000 MB, 0 GPU(s) on partition 'gpu', but the largest node there (vm) "
        "has 2 CPU(s), 22899 MB, 0 GPU(s) (too much CPUs); SLURM would leave the job pending forever"
    ]


def test_memory_gpus_partitions_and_node_counts() -> None:
    nodes = parse_sinfo_nodes(SINFO_GPU)
    plan = [
        request("train", "gpu", cpus=2, mem=64000, gpus=8, nodes=2),  # gpu01 + gpu02: fits
        request("generate", "gpu", mem=600000, gpus=1),  # memory
        request("tokenize_shard", "gpu", gpus=16),  # GPUs
        request("assemble", "bigmem"),  # no such partition
        request("collect", mem=300000),  # default partition cpu: memory
    ]
    problems = requests_that_do_not_fit(plan, nodes, default_partition(SINFO_GPU))
    assert len(problems) == 4
    assert problems[0].startswith("rule generate asks for 1 CPU(s), 600000 MB, 1 GPU(s) on partition 'gpu'") and "(gpu01) has 32 CPU(s), 500000 MB, 8 GPU(s) (too much memory)" in problems[0]
    assert "(too much GPUs)" in problems[1]
    assert problems[2] == "rule assemble: partition 'bigmem' does not exist (sinfo lists: cpu, gpu)"
    assert problems[3].startswith("rule collect asks") and "partition 'cpu'" in problems[3]
    # Three nodes of 8 GPUs: only two exist; each node alone would hold one share.
    (three,) = requests_that_do_not_fit([request("train", "gpu", cpus=2, mem=64000, gpus=8, nodes=3)], nodes, "cpu")
    assert three.startswith("rule train asks for 3 node(s) each with 2 CPU(s), 64000 MB, 8 GPU(s)") and "(only 2 node(s) can hold it)" in three


# ----------------------------------------------------------------------------------------------
# The status command
# ----------------------------------------------------------------------------------------------

SCONTROL_ACCOUNTING = """\
Configuration data as of 2026-01-01T00:00:00
AccountingStorageType   = accounting_storage/slurmdbd
MinJobAge               = 300 sec
SLURM_VERSION           = 22.05.8
"""
SCONTROL_NONE = SCONTROL_ACCOUNTING.replace("accounting_storage/slurmdbd", "accounting_storage/none")


def test_parse_scontrol_config() -> None:
    config = parse_scontrol_config(SCONTROL_ACCOUNTING)
    assert config["AccountingStorageType"] == "accounting_storage/slurmdbd" and config["MinJobAge"] == "300 sec"
    assert [min_job_age_seconds(v) for v in ("300 sec", "1h", "20", None, "n/a")] == [300, 3600, 20, None, None]


def test_status_command_against_the_cluster() -> None:
    accounting, none = parse_scontrol_config(SCONTROL_ACCOUNTING), parse_scontrol_config(SCONTROL_NONE)
    assert status_command_problem("sacct", accounting, 5) is None
    assert status_command_problem("squeue", none, 5) is None
    assert status_command_problem("squeue", accounting, 5) is None
    hang = status_command_problem("sacct", none, 5)
    assert hang is not None and "keeps no accounting" in hang and "slurm-status-command: squeue" in hang
    young = status_command_problem("squeue", {**none, "MinJobAge": "60 sec"}, 40)
    assert young is not None and "3 x 40 s" in young and "at most 20" in young and "cannot answer" in young
    unset = status_command_problem(None, accounting, 5)
    assert unset is not None and "sets no slurm-status-command" in unset


# ----------------------------------------------------------------------------------------------
# Multi-node training: one torchrun per node from SLURM's environment
# ----------------------------------------------------------------------------------------------

# What srun sets in the task on the third of four nodes of job 123456.
SLURM_ENV = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[01-03,07]",
    "SLURM_STEP_NODELIST": "gpu[01-03,07]",
    "SLURM_NNODES": "4",
    "SLURM_STEP_NUM_NODES": "4",
    "SLURM_NODEID": "2",
    "SLURM_PROCID": "2",
}


def test_node_launch_from_slurm_environment() -> None:
    launch = node_launch(SLURM_ENV, nproc_per_node=8)
    assert launch.hosts == ("gpu01", "gpu02", "gpu03", "gpu07")
    assert launch.node_rank == 2
    assert launch.rdzv_endpoint == "gpu01:30956"  # 29500 + 123456 % 2000
    assert launch.rdzv_id == "medmax-123456"
    assert torchrun_command(launch, "/venv/bin/python", ["train", "--dataset", "d.parquet"]) == [
        "/venv/bin/python", "-m", "torch.distributed.run",
        "--nnodes", "4", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu01:30956", "--rdzv-id", "medmax-123456", "--rdzv-conf", "is_host=0",
        "-m", "medmax_pipeline", "train", "--dataset", "d.parquet",
    ]
    first = node_launch({**SLURM_ENV, "SLURM_NODEID": "0", "MEDMAX_RDZV_PORT": "29400"}, nproc_per_node=1)
    assert first.node_rank == 0 and first.rdzv_endpoint == "gpu01:29400"
    assert first.torchrun_args[-2:] == ("--rdzv-conf", "is_host=1")
    # The job-level list when the step's is missing (an srun-less test harness).
    step_less = {k: v for k, v in SLURM_ENV.items() if not k.startswith("SLURM_STEP")}
    assert node_launch(step_less, 8).hosts == launch.hosts


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_NODEID": "4"}, "SLURM_NODEID='4' is not one of the 4 node"),
        ({"SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2"}, "names 4 node"),
        ({"SLURM_JOB_ID": "", "SLURM_JOBID": ""}, "SLURM_JOB_ID or SLURM_JOBID is not set"),
        ({"SLURM_STEP_NODELIST": "", "SLURM_JOB_NODELIST": ""}, "SLURM_STEP_NODELIST or SLURM_JOB_NODELIST or SLURM_NODELIST is not set"),
        ({"MEDMAX_RDZV_PORT": "70000"}, "is not a port number"),
    ],
)
def test_node_launch_refuses_an_inconsistent_environment(change: dict[str, str], message: str) -> None:
    with pytest.raises(SlurmError, match=message):
        node_launch({**SLURM_ENV, **change}, nproc_per_node=8)


def test_rendezvous_port_depends_on_the_job_only() -> None:
    assert rendezvous_port({"SLURM_JOB_ID": "1"}) == 29501
    assert rendezvous_port({"SLURM_JOB_ID": "2001"}) == 29501
    assert rendezvous_port({"SLURM_JOB_ID": "1", "MEDMAX_RDZV_PORT": "12345"}) == 12345


def test_train_node_runs_only_train() -> None:
    args = argparse.Namespace(nproc_per_node=1, medmax_args=["--", "export", "--adapter", "a"])
    with pytest.raises(SlurmError, match="runs `-- train ARGS`, got export"):
        multinode.run(args)


# ----------------------------------------------------------------------------------------------
# Node-local paths
# ----------------------------------------------------------------------------------------------

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
tmpfs /tmp tmpfs rw 0 0
nfs01:/export/home /home nfs4 rw 0 0
lustre@o2ib:/scratch /scratch lustre rw 0 0
tmpfs /scratch/my\\040tmp tmpfs rw 0 0
"""


def test_paths_on_node_local_filesystems_are_named() -> None:
    mounts = parse_mounts(MOUNTS)
    assert ("/scratch/my tmp", "tmpfs") in mounts
    assert filesystem_of("/scratch/run/results", mounts) == ("/scratch", "lustre")
    assert filesystem_of("/tmpdata/x", mounts) == ("/", "ext4")  # /tmp is no prefix of /tmpdata
    problems = node_local_paths(
        {"results_dir": "/tmp/run/results", "the Python interpreter": "/home/me/medmax/.venv/bin/python",
         "checkpoint": "/scratch/my tmp/anole", "images.public_root": "/scratch/medmax/images"},
        mounts,
    )
    assert problems == [
        "results_dir /tmp/run/results is on tmpfs (/tmp), which each node has its own of: jobs on other nodes would not see it; "
        "put it on a filesystem the nodes share",
        "checkpoint /scratch/my tmp/anole is on tmpfs (/scratch/my tmp), which each node has its own of: jobs on other nodes "
        "would not see it; put it on a filesystem the nodes share",
    ]
