"""Where this process stands among the ranks of a launcher (torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK; nothing set means one process): the one reading of that environment for every stage."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


class RankEnvironmentError(ValueError):
    """RANK / WORLD_SIZE / LOCAL_RANK that do not describe a rank."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_variable(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise RankEnvironmentError(f"{name}={text!r} is not a whole number") from None


def ranks_from_env(env: Mapping[str, str] | None = None) -> Ranks:
    """The process's rank, world size and local rank. LOCAL_RANK defaults to the rank (one node,
    as torchrun --standalone numbers them)."""
    env = os.environ if env is None else env
    world_size = _int_variable(env, "WORLD_SIZE", 1)
    rank = _int_variable(env, "RANK", 0)
    local_rank = _int_variable(env, "LOCAL_RANK", rank)
    if world_size < 1:
        raise RankEnvironmentError(f"WORLD_SIZE={world_size} must be at least 1")
    if not 0 <= rank < world_size:
        raise RankEnvironmentError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if not 0 <= local_rank < world_size:
        raise RankEnvironmentError(f"LOCAL_RANK={local_rank} is outside WORLD_SIZE={world_size}")
    return Ranks(rank, world_size, local_rank)
