"""One node's share of a multi-node training job (train.nodes > 1).

The train rule runs `srun --nodes N --ntasks N --ntasks-per-node 1 ... medmax train-node
--nproc-per-node G -- train ARGS`: SLURM starts this command once on every node of the
allocation, and each starts one torchrun over its G local processes (GPUs, or 1 on CPU). The
torchruns meet through c10d rendezvous on the first node of the allocation, at a port derived from
the job id, so the world is N x G ranks and DeepSpeed ZeRO-2 spans all of them. Everything comes
from SLURM's environment of the step (SLURM_STEP_NODELIST / SLURM_JOB_NODELIST, SLURM_NODEID,
SLURM_JOB_ID): `node_launch` is the pure derivation the tests pin; `run` replaces this process
with torchrun. Checkpoints are written into the shared results folder by global rank 0 (the
DeepSpeed shards by each rank) and hold no host names, so a resumed job may run on other nodes.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from medmax_pipeline.core.slurm import SlurmError, expand_hostlist

RDZV_PORT_ENV = "MEDMAX_RDZV_PORT"
# Rendezvous ports: one per job id in [BASE, BASE + SPAN), so two jobs sharing a first node do not collide.
RDZV_PORT_BASE = 29500
RDZV_PORT_SPAN = 2000


@dataclass(frozen=True)
class NodeLaunch:
    hosts: tuple[str, ...]
    node_rank: int
    rdzv_endpoint: str
    rdzv_id: str
    torchrun_args: tuple[str, ...]


def _required(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        if env.get(name):
            return env[name]
    raise SlurmError(f"{' or '.join(names)} is not set: `medmax train-node` runs under srun inside a SLURM job")


def rendezvous_port(env: Mapping[str, str]) -> int:
    """MEDMAX_RDZV_PORT when set, else RDZV_PORT_BASE + job id mod RDZV_PORT_SPAN."""
    if env.get(RDZV_PORT_ENV):
        port = env[RDZV_PORT_ENV]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise SlurmError(f"{RDZV_PORT_ENV}={port!r} is not a port number")
        return int(port)
    job_id = _required(env, "SLURM_JOB_ID", "SLURM_JOBID")
    if not job_id.isdigit():
        raise SlurmError(f"SLURM_JOB_ID={job_id!r} is not a number")
    return RDZV_PORT_BASE + int(job_id) % RDZV_PORT_SPAN


def node_launch(env: Mapping[str, str], nproc_per_node: int) -> NodeLaunch:
    """The torchrun arguments of this node from SLURM's environment of the step."""
    if nproc_per_node < 1:
        raise SlurmError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    hosts = expand_hostlist(_required(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    count = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or str(len(hosts))
    if not count.isdigit() or int(count) != len(hosts):
        raise SlurmError(f"the node list names {len(hosts)} node(s) but SLURM says {count}")
    node_id = _required(env, "SLURM_NODEID")
    if not node_id.isdigit() or int(node_id) >= len(hosts):
        raise SlurmError(f"SLURM_NODEID={node_id!r} is not one of the {len(hosts)} node(s) {','.join(hosts)}")
    rank = int(node_id)
    endpoint = f"{hosts[0]}:{rendezvous_port(env)}"
    rdzv_id = f"medmax-{_required(env, 'SLURM_JOB_ID', 'SLURM_JOBID')}"
    args = (
        # No --node-rank: c10d assigns ranks itself (torchrun ignores it there, with a warning).
        "--nnodes", str(len(hosts)), "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
        # The first node hosts the rendezvous store; the others only connect (no guessing from host names).
        "--rdzv-conf", f"is_host={1 if rank == 0 else 0}",
    )
    return NodeLaunch(tuple(hosts), rank, endpoint, rdzv_id, args)


def torchrun_command(launch: NodeLaunch, python: str, medmax_args: Sequence[str]) -> list[str]:
    """The command this node runs: torchrun over the package's command line."""
    return [python, "-m", "torch.distributed.run", *launch.torchrun_args, "-m", "medmax_pipeline", *medmax_args]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc-per-node", type=int, required=True, help="processes on this node: its GPUs, or 1 on CPU")
    parser.add_argument("medmax_args", nargs=argparse.REMAINDER, help="-- train ARGS: the medmax command every rank runs")


def run(args: argparse.Namespace) -> int:
    medmax_args = list(args.medmax_args)
    if medmax_args[:1] == ["--"]:
        medmax_args = medmax_args[1:]
    if medmax_args[:1] != ["train"]:
        raise SlurmError(f"train-node runs `-- train ARGS`, got {' '.join(medmax_args[:1]) or 'nothing'}")
    launch = node_launch(os.environ, args.nproc_per_node)
    print(
        f"medmax train-node: node {launch.node_rank} of {len(launch.hosts)} ({','.join(launch.hosts)}), "
        f"{args.nproc_per_node} process(es), rendezvous {launch.rdzv_endpoint} ({launch.rdzv_id})",
        file=sys.stderr, flush=True,
    )
    command = torchrun_command(launch, sys.executable, medmax_args)
    os.execv(command[0], command)
    return 1  # not reached
