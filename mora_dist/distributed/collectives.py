"""The few collectives the rest of the package needs, each a no-op (or the local value) in one process.

Modules outside ``mora_dist.distributed`` ask these (and ``env.rank`` / ``env.world_size``) instead of calling
``torch.distributed`` themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mora_dist.distributed.env import world_size


def collective_device() -> torch.device:
    """Where the tensors of a collective of the default group must live: the current GPU under NCCL, which has no
    CPU path, else the CPU (gloo, MPI, and a mixed ``cpu:gloo,cuda:nccl`` group)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(values: list[int]) -> list[int]:
    """The element-wise maximum of ``values`` over the workers (one all-reduce; ``values`` in one process)."""
    if world_size() == 1:
        return [int(v) for v in values]
    t = torch.tensor(values, dtype=torch.long, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.cpu()]


def any_rank(flag: bool) -> bool:
    """True on every worker when ``flag`` is set on any of them (one all-reduce): a decision all ranks share,
    so that none waits for the others forever."""
    return bool(max_over_ranks([1 if flag else 0])[0])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every worker's ``obj``, in rank order, on every worker (``[obj]`` in one process)."""
    n = world_size()
    if n == 1:
        return [obj]
    out: list[Any] = [None] * n
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the workers (in place; ``value`` itself in one process)."""
    n = world_size()
    if n > 1:
        dist.all_reduce(value)
        value /= n
    return value
