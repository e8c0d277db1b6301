"""`taskbalance train` under DDP: a non-finite loss on one rank stops every rank at that step.

Before, each rank checked its own losses and stopped alone; its peer went on into DDP's backward
and the balancer's collectives and waited there until the process group's timeout.
"""

from __future__ import annotations

import math

import torch

from conftest import gloo_group, run_ranks
from taskbalance.bench.harness import _checked_on_every_rank


def _finite_on_every_rank(losses: torch.Tensor) -> bool:
    return _checked_on_every_rank(losses, [True] * losses.shape[0])[0]


def _worker(rank: int, store: str, out: str) -> None:
    with gloo_group(rank, store):
        finite = torch.tensor([1.0, 2.0])
        one_bad = torch.tensor([1.0, math.nan if rank == 1 else 2.0])
        result = {
            "all_finite": _finite_on_every_rank(finite),
            "nan_on_rank_1": _finite_on_every_rank(one_bad),
            "inf_on_rank_0": _finite_on_every_rank(
                torch.tensor([math.inf, 1.0]) if rank == 0 else finite
            ),
        }
        torch.save(result, f"{out}/rank{rank}.pt")


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    results = run_ranks(_worker, tmp_path)
    for rank, result in enumerate(results):
        assert result == {"all_finite": True, "nan_on_rank_1": False, "inf_on_rank_0": False}, rank


def test_outside_a_process_group_the_check_is_local():
    assert _finite_on_every_rank(torch.tensor([1.0, 2.0]))
    assert not _finite_on_every_rank(torch.tensor([1.0, math.nan]))
