"""Ranks: who this process is, the collectives the recipe needs, its device, and DeepSpeed's
process group (NCCL on GPUs, gloo on CPU). A run without torchrun is a world of one."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch

from medmax_pipeline.core.ranks import Ranks, ranks_from_env
from medmax_pipeline.models import chameleon

from .config import TrainInputError


@dataclass(frozen=True)
class Dist(Ranks):
    """core/ranks.Ranks (rank, world size, local rank, is_main) plus the collectives training needs."""

    @staticmethod
    def from_env() -> "Dist":
        ranks = ranks_from_env()  # the one reading of torchrun's environment
        return Dist(ranks.rank, ranks.world_size, ranks.local_rank)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def log(self, message: str) -> None:
        """One `medmax train:` line on stderr, from the main rank only."""
        if self.is_main:
            print(f"medmax train: {message}", file=sys.stderr, flush=True)


def training_device(requested: str, dist: Dist) -> torch.device:
    """The device this rank trains on: with several ranks on GPUs, its own GPU."""
    device = chameleon.resolve_device(requested)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_deepspeed(device: torch.device) -> None:
    """Set up DeepSpeed's process group: NCCL on GPUs, gloo on CPU; a world of one without torchrun."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # also on a host that has CUDA
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != device.type:
        raise TrainInputError(
            f"DeepSpeed's accelerator is {get_accelerator().device_name()!r} but training runs on {device.type!r}; "
            f"set DS_ACCELERATOR={device.type}"
        )
    # A plain `medmax train --deepspeed ...` (no torchrun) is a world of one; without these
    # variables DeepSpeed would try MPI discovery.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())  # two single-process runs on one host must not collide
    if device.type == "cpu":
        # DeepSpeed's CPU accelerator would JIT-compile a shared-memory all-reduce (a C++
        # toolchain and ~40 s on first use); plain gloo is enough for CPU runs, which are checks.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
