"""Length-grouped batching: deterministic, every example once per epoch, less padding, micro-batches that do not
depend on the world size, and the orchestrator's plan of a task."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mora_dist.config import ConfigError, load_config
from mora_dist.data.grouping import batch_order, grouped_batch_order, padding_fraction, task_batch_order


def _lengths(n=203, seed=0):
    rng = random.Random(seed)
    return [rng.choice([rng.randint(10, 40), rng.randint(200, 900)]) for _ in range(n)]


def test_deterministic_and_every_example_once_per_epoch():
    lengths = _lengths()
    a = list(grouped_batch_order(lengths, 8, 100, seed=3))
    assert a == list(grouped_batch_order(lengths, 8, 100, seed=3))
    assert a != list(grouped_batch_order(lengths, 8, 100, seed=4))
    assert all(len(b) == 8 for b in a)
    flat = [i for b in a for i in b]
    # 800 = 3 full epochs of 203 plus 191: each example 3 or 4 times, exactly like the shuffled order
    assert set(Counter(flat).values()) <= {3, 4} and len(set(flat)) == len(lengths)
    assert Counter(Counter(flat).values()) == Counter(Counter(i for b in batch_order(203, 8, 100, 3)
                                                              for i in b).values())


def test_less_padding_than_shuffled_batches():
    lengths = _lengths()
    micro = 4
    plain = [b[j:j + micro] for b in batch_order(len(lengths), 16, 40, 1) for j in range(0, 16, micro)]
    grouped = [b[j:j + micro] for b in grouped_batch_order(lengths, 16, 40, 1) for j in range(0, 16, micro)]
    assert padding_fraction(lengths, grouped) < 0.5 * padding_fraction(lengths, plain)


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_do_not_depend_on_the_world_size(micro):
    """The orchestrator cuts global batch ``idx`` into ``mb``-sized micro-batches, worker r taking the r-th
    ``mb x gas`` slice: 1 worker with accumulation 4 and 4 workers without see the same micro-batches."""
    lengths = _lengths()
    order = list(grouped_batch_order(lengths, 4 * micro, 30, seed=0))
    for idx in order:
        one = [idx[j:j + micro] for j in range(0, len(idx), micro)]  # world 1, gas 4
        four = [idx[r * micro:(r + 1) * micro] for r in range(4)]  # world 4, gas 1
        assert one == four
        assert max(lengths[i] for i in idx) - min(lengths[i] for i in idx) <= max(lengths) - min(lengths)


def test_task_plan_and_config(tmp_path):
    encoded = [{"input_ids": [0] * n} for n in _lengths(50)]
    assert task_batch_order(encoded, 8, 10, 5, False) == list(batch_order(50, 8, 10, 5))
    grouped = task_batch_order(encoded, 8, 10, 5, True)
    assert grouped == list(grouped_batch_order([len(e["input_ids"]) for e in encoded], 8, 10, 5))
    resumed = task_batch_order(encoded, 8, 10, 5, True)[4:]  # a resumed run recomputes the plan
    assert resumed == grouped[4:]
    (tmp_path / "c.yaml").write_text("tasks: [{name: a}]\ntrain: {group_by_length: true}\n")
    assert load_config(tmp_path / "c.yaml").train.group_by_length is True
    with pytest.raises(ConfigError, match="group_by_length"):
        load_config(tmp_path / "c.yaml", ["train.group_by_length=maybe"])


def test_tiny_tasks_smaller_than_a_batch():
    order = list(grouped_batch_order([5, 9, 3], 8, 4, seed=0))
    assert all(len(b) == 8 for b in order)
    assert sorted(Counter(i for b in order for i in b).values()) == [10, 11, 11]
