"""When and on what a task trains: optimizer steps, learning-rate schedule, and each worker's share of the data.

One home for the step arithmetic every trainer shares: the one-process loop, the DeepSpeed engine's scheduler
and the orchestrator all ask these functions, so the schedule is the same whatever runs underneath.

* ``plan_task``: optimizer steps, learning rate, gradient accumulation and global batch of a task.
* ``lr_factor``: the multiplier of the learning rate at a step (warm-up, then cosine to 0 or constant).
* ``rank_micro_batches`` / ``rank_stats_batches``: this worker's slice of a global batch (training) and of the
  statistics pass, so that any world size sees the same global batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mora_dist.data.tokenize import collate


@dataclass(frozen=True)
class TaskPlan:
    """What one task trains: ``steps`` optimizer steps at learning rate ``lr``, each of ``global_batch``
    examples, i.e. ``gas`` micro-batches on each worker."""

    steps: int
    lr: float
    gas: int
    global_batch: int


def global_batch(train_cfg, world_size: int) -> int:
    """Examples per optimizer step of ``train_cfg`` (``run.train``) on ``world_size`` workers."""
    return train_cfg.micro_batch_size * world_size * train_cfg.gradient_accumulation(world_size)


def steps_for(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a task: ``max_steps`` if set, else ``ceil(epochs * n / batch)``."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * n_examples / batch_size))


def plan_task(cfg, index: int, n_examples: int, world_size: int) -> TaskPlan:
    """The plan of task ``index`` of run config ``cfg`` with ``n_examples`` training examples; a task's own
    ``epochs``, ``max_steps`` and ``lr`` override the run's."""
    task, t = cfg.tasks[index], cfg.train
    gas = t.gradient_accumulation(world_size)
    batch = t.micro_batch_size * world_size * gas
    steps = steps_for(n_examples, batch, task.epochs if task.epochs is not None else t.epochs,
                      task.max_steps if task.max_steps is not None else t.max_steps)
    return TaskPlan(steps, task.lr if task.lr is not None else t.lr, gas, batch)


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine to 0 or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def rank_micro_batches(encoded: list[dict], idx: list[int], rank: int, micro: int, gas: int,
                       pad_id: int) -> list[dict]:
    """Worker ``rank``'s micro-batches of one optimizer step whose global batch is ``idx``: the ``rank``-th slice
    of ``micro * gas`` examples, cut into micro-batches (1 worker with accumulation 4 and 4 workers without
    see the same micro-batches)."""
    mine = idx[rank * micro * gas:(rank + 1) * micro * gas]
    return [collate([encoded[i] for i in mine[j:j + micro]], pad_id) for j in range(0, len(mine), micro)]


def rank_stats_batches(encoded: list[dict], rank: int, world_size: int, micro: int, pad_id: int,
                       limit: int | None = None) -> list[dict]:
    """Worker ``rank``'s input batches (no labels) of the statistics pass over the first ``limit`` examples.

    Every worker gets the same number of batches (the statistics all-reduce needs it); the remainder that does
    not fill a batch on every worker is left out.
    """
    encoded = encoded[:limit] if limit else encoded
    per_worker = max(1, len(encoded) // (world_size * micro)) * micro
    mine = encoded[rank * per_worker:(rank + 1) * per_worker]
    batches = [collate(mine[j:j + micro], pad_id) for j in range(0, len(mine), micro)]
    for b in batches:
        b.pop("labels")
    return batches
