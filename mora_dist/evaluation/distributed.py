"""What evaluation needs across workers: who am I, deal work so ranks stay in lockstep, gather.

Evaluation under ZeRO-3 needs every rank to run the same number of forward passes (each forward all-gathers the
sharded weights), so work is dealt in *batches*: the list of batches is split round-robin over ranks and ranks
that run out are given a dummy batch whose output is thrown away. Results come back with their original
indices and are all-gathered, so every rank ends with the full, identically ordered result list.

All helpers fall back to single-process behaviour when torch.distributed is not initialised (the collectives
themselves are ``mora_dist.distributed``'s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

from mora_dist.distributed.collectives import all_gather_objects
from mora_dist.distributed.env import rank, world_size

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    return rank(), world_size()


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive slices of ``order`` of at most ``batch_size`` indices."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def deal_batches(all_batches: list[list[int]], rank: int, world: int) -> list[list[int] | None]:
    """This rank's share of ``all_batches`` (round-robin), padded with ``None`` (a dummy batch) to equal length.

    Every rank gets ``ceil(len(all_batches) / world)`` entries, at least one, so the number of model calls is the
    same on all ranks. A ``None`` entry means "run one dummy input and discard the result".
    """
    mine: list[list[int] | None] = list(all_batches[rank::world])
    n_calls = max(1, math.ceil(len(all_batches) / world))
    mine += [None] * (n_calls - len(mine))
    return mine


def gather_indexed(local: list[tuple[int, Any]], n_items: int) -> list[Any]:
    """All-gather ``(index, value)`` pairs from every rank and return the values ordered by index.

    Raises ``RuntimeError`` if an index in ``range(n_items)`` was computed by no rank.
    """
    pairs = [pair for part in all_gather_objects(local) for pair in part]
    out: list[Any] = [None] * n_items
    seen = [False] * n_items
    for index, value in pairs:
        out[index], seen[index] = value, True
    if not all(seen):
        missing = [i for i, s in enumerate(seen) if not s][:5]
        raise RuntimeError(f"no rank returned a result for items {missing} (of {n_items})")
    return out
