"""One reading of the launcher's rank environment (issue 21 item 5), with known answers."""

from __future__ import annotations

import pytest

from medmax_pipeline.core.ranks import RankEnvironmentError, Ranks, ranks_from_env


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Ranks(0, 1, 0)),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, Ranks(3, 8, 1)),  # rank 3 = node 1, gpu 1 of 2-gpu nodes
        ({"RANK": "2", "WORLD_SIZE": "4"}, Ranks(2, 4, 2)),  # no LOCAL_RANK: one node
        ({"RANK": "", "WORLD_SIZE": ""}, Ranks(0, 1, 0)),
    ],
)
def test_ranks_from_env(env: dict, expected: Ranks) -> None:
    assert ranks_from_env(env) == expected
    assert ranks_from_env(env).is_main == (expected.rank == 0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is outside WORLD_SIZE=4"),
        ({"RANK": "x"}, "RANK='x' is not a whole number"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "5"}, "LOCAL_RANK=5 is outside WORLD_SIZE=2"),
    ],
)
def test_bad_rank_environments_are_named(env: dict, message: str) -> None:
    with pytest.raises(RankEnvironmentError, match=message):
        ranks_from_env(env)
