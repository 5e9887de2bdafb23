"""Length-grouped batching within a task (``train.group_by_length``): less padding, the same examples per epoch.

The plan of a task's global batches is a pure function of (example lengths, global batch size, steps, seed),
computed the same way on every worker before the batches are cut into per-worker micro-batches, so it does not
depend on the world size, and a resumed run recomputes it and continues at its step.

Per epoch (a seeded permutation of the examples, as ``batch_order``): the permutation is cut
into groups of ``mega`` global batches; each group is sorted by length (longest first; ties keep the shuffled
order) and cut into global batches, so a batch, and each micro-batch cut from it, holds examples of similar
length; the full batches of the epoch are then shuffled (seeded) so that lengths do not drift along the task.
The examples left over at the end of an epoch (fewer than a batch) open the next epoch's first batch, which
is filled from the head of the next permutation, like ``batch_order`` does.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

MEGA_BATCHES = 50  # global batches sorted together (transformers' LengthGroupedSampler uses the same factor)


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """Example indices of each batch: seeded reshuffles per epoch, ``steps`` batches in all."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(n_examples))
            rng.shuffle(perm)
            order += perm
        yield order[:batch_size]
        order = order[batch_size:]


def grouped_batch_order(lengths: Sequence[int], batch_size: int, steps: int, seed: int,
                        mega: int = MEGA_BATCHES) -> Iterator[list[int]]:
    """Example indices of each global batch, ``steps`` batches, grouped by length (see the module docstring)."""
    rng = random.Random(seed)
    queue: list[list[int]] = []
    leftover: list[int] = []
    n = len(lengths)
    for _ in range(steps):
        while not queue:
            perm = list(range(n))
            rng.shuffle(perm)
            head = []
            if leftover:
                need = batch_size - len(leftover)
                if need > len(perm):  # fewer examples than a batch: keep filling from the next permutation
                    leftover += perm
                    continue
                head = [leftover + perm[:need]]
                perm = perm[need:]
            batches = []
            for start in range(0, len(perm), batch_size * mega):
                group = sorted(perm[start:start + batch_size * mega], key=lambda i: -lengths[i])
                batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
            leftover = batches.pop() if batches and len(batches[-1]) < batch_size else []
            rng.shuffle(batches)
            queue = head + batches
        yield queue.pop(0)


def padding_fraction(lengths: Sequence[int], micro_batches: Sequence[Sequence[int]]) -> float:
    """Share of padding tokens when each micro-batch is padded to its longest example."""
    padded = sum(max(lengths[i] for i in mb) * len(mb) for mb in micro_batches if mb)
    real = sum(lengths[i] for mb in micro_batches for i in mb)
    return 1.0 - real / padded if padded else 0.0


def task_batch_order(encoded: Sequence[dict], batch_size: int, steps: int, seed: int,
                     group_by_length: bool) -> list[list[int]]:
    """The global batches of a task as the orchestrator trains them: seeded shuffles, or grouped by length."""
    if group_by_length:
        return list(grouped_batch_order([len(e["input_ids"]) for e in encoded], batch_size, steps, seed))
    return list(batch_order(len(encoded), batch_size, steps, seed))
