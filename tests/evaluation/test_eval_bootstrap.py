"""The paired bootstrap over test examples against hand-computed resamples, and its checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mora_dist.evaluation.bootstrap import (BootstrapSettings, load_example_scores, paired_intervals,
                                            percentile_interval, run_intervals)
from mora_dist.evaluation.generation import TaskEval
from mora_dist.evaluation.results import write_stage_results

TASKS = ["A", "B"]
BASE = {"A": [0, 0, 1], "B": [0, 0, 0]}
# per-example accuracy of two methods on 3 test examples per task, after task A and after task B
RUN1 = [BASE, {"A": [1, 1, 0], "B": [0, 1, 0]}, {"A": [1, 0, 0], "B": [1, 1, 1]}]
RUN2 = [BASE, {"A": [1, 1, 1], "B": [0, 0, 0]}, {"A": [1, 1, 1], "B": [0, 1, 1]}]
# five fixed resamples of the 3 indices per task
IDX = [np.array([[0, 1, 2], [0, 0, 0], [1, 1, 2], [2, 2, 2], [0, 1, 1]]),
       np.array([[0, 0, 0], [0, 1, 2], [1, 1, 1], [2, 0, 1], [1, 2, 2]])]
# confidence 0.5 over 5 resamples: the 25th and 75th percentiles are exactly the 2nd and 4th smallest values
HALF = BootstrapSettings(resamples=5, confidence=0.5, seed=0)


def _write_run(run_dir, stages, tasks=TASKS, prompts=None):
    for stage, scores in enumerate(stages):
        in_domain = {}
        for task, values in scores.items():
            rows = [{"prompt": (prompts or {}).get(task, f"{task} question {i}"), "reference": "x",
                     "prediction": "x" if v else "y", "score": float(v)} for i, v in enumerate(values)]
            in_domain[task] = TaskEval(task, "accuracy", sum(values) / len(values), len(values), rows)
        write_stage_results(run_dir, stage, tasks[stage - 1] if stage else None, in_domain)
    return run_dir


def test_run_intervals_equal_the_hand_computed_resamples(tmp_path):
    # Per resample (matrix rows base / after A / after B; task A then B):
    #   r1: A 1/3 2/3 1/3, B 0 0 1    -> AP 2/3, LA 5/6, forgetting 1/3, FWT 0
    #   r2: A 0 1 1,       B 0 1/3 1  -> AP 1,   LA 1,   forgetting 0,   FWT 1/3
    #   r3: A 1/3 2/3 0,   B 0 1 1    -> AP 1/2, LA 5/6, forgetting 2/3, FWT 1
    #   r4: A 1 0 0,       B 0 1/3 1  -> AP 1/2, LA 1/2, forgetting 0,   FWT 1/3
    #   r5: A 0 1 1/3,     B 0 1/3 1  -> AP 2/3, LA 1,   forgetting 2/3, FWT 1/3
    # BWT = -forgetting here (T = 2); BWT_trace = max(forgetting, 0) / 2.
    ints = run_intervals(_write_run(tmp_path / "r1", RUN1), TASKS, HALF, indices=IDX)
    assert ints["available"] and ints["examples"] == {"A": 3, "B": 3} and ints["confidence"] == 0.5
    m = ints["metrics"]
    assert m["AP"] == pytest.approx([1 / 2, 2 / 3])
    assert m["LA"] == pytest.approx([5 / 6, 1])
    assert m["forgetting"] == pytest.approx([0, 2 / 3])
    assert m["BWT"] == pytest.approx([-2 / 3, 0])
    assert m["BWT_trace"] == pytest.approx([0, 1 / 3])
    assert m["FWT"] == pytest.approx([1 / 3, 1 / 3])
    assert m["LA_per_task"]["A"] == pytest.approx([2 / 3, 1])   # R[1][A]: 2/3, 1, 2/3, 0, 1
    assert m["LA_per_task"]["B"] == pytest.approx([1, 1])


def test_paired_differences_equal_the_hand_computed_resamples(tmp_path):
    # Method 1 per resample as in the test above. Method 2 on the same resamples: R[2][A] = 1 and R[1][A] = 1
    # always; R[2][B] = 0, 2/3, 1, 2/3, 1;
    # R[1][B] = 0 -> AP 1/2, 5/6, 1, 5/6, 1; forgetting 0; FWT 0; LA 1/2, 5/6, 1, 5/6, 1.
    d1, d2 = _write_run(tmp_path / "m1", RUN1), _write_run(tmp_path / "m2", RUN2)
    out = paired_intervals({"m1": [d1], "m2": [d2]}, TASKS, "m1", HALF, indices=IDX)
    diff = out["differences"]["m2"]
    assert out["reference"] == "m1" and list(out["differences"]) == ["m2"]
    assert diff["AP"]["interval"] == pytest.approx([-1 / 6, 1 / 3]) and not diff["AP"]["resolved"]
    assert diff["LA"]["interval"] == pytest.approx([-1 / 6, 1 / 6]) and not diff["LA"]["resolved"]
    assert diff["forgetting"]["interval"] == pytest.approx([-2 / 3, 0]) and not diff["forgetting"]["resolved"]
    assert diff["FWT"]["interval"] == pytest.approx([-1 / 3, -1 / 3]) and diff["FWT"]["resolved"]
    assert out["methods"]["m1"]["AP"] == pytest.approx([1 / 2, 2 / 3])
    assert out["methods"]["m2"]["AP"] == pytest.approx([5 / 6, 1])
    # two seeds of a method: the interval is that of the mean over seeds, resample by resample
    two = paired_intervals({"m1": [d1], "m2": [d2, d1]}, TASKS, "m1", HALF, indices=IDX)
    # (m2 + m1) / 2 - m1 = (m2 - m1) / 2 for each resample
    assert two["differences"]["m2"]["AP"]["interval"] == pytest.approx([-1 / 12, 1 / 6])


def test_seeded_draw_is_reproducible_and_covers_the_binomial_spread(tmp_path):
    values = [1] * 50 + [0] * 50
    run = _write_run(tmp_path / "one", [{"A": values}, {"A": values}], tasks=["A"])
    settings = BootstrapSettings(resamples=2000, confidence=0.95, seed=7)
    a, b = run_intervals(run, ["A"], settings), run_intervals(run, ["A"], settings)
    assert a == b
    lo, hi = a["metrics"]["AP"]
    # the sampling distribution of a mean of 100 fair coins: 0.5 +- 1.96 * 0.05
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)
    assert a["metrics"]["BWT"] is None  # undefined for one task
    assert percentile_interval(np.array([np.nan, np.nan]), 0.9) is None


def test_unpaired_or_missing_examples_are_reported(tmp_path):
    d1 = _write_run(tmp_path / "m1", RUN1)
    other = _write_run(tmp_path / "m3", RUN1, prompts={"B": "another question"})
    with pytest.raises(ValueError, match="other test examples"):
        paired_intervals({"m1": [d1], "m3": [other]}, TASKS, "m1", HALF)
    # a task scored on other examples at a later stage of the same run
    bad = _write_run(tmp_path / "bad", RUN1)
    samples = bad / "eval" / "stage_02_B.samples.json"
    data = json.loads(samples.read_text())
    data["A"][0]["prompt"] = "changed"
    samples.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="stage_02_B.samples.json.*other examples"):
        load_example_scores(bad, TASKS)
    # a stored score that is not the mean of its per-example scores
    data["A"][0]["prompt"] = "A question 0"
    data["A"][1]["score"] = 1.0  # was 0
    samples.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not the mean"):
        load_example_scores(bad, TASKS)
    samples.unlink()
    missing = run_intervals(bad, TASKS, HALF)
    assert missing["available"] is False and "stage_02_B.samples.json" in missing["reason"]
    with pytest.raises(ValueError):
        BootstrapSettings(resamples=0)
    with pytest.raises(ValueError):
        BootstrapSettings(confidence=1.0)


def test_report_shows_intervals_and_learning_accuracy(tmp_path):
    from mora_dist.evaluation.report import rebuild_report

    run = _write_run(tmp_path / "r1", RUN1)
    rep = rebuild_report(run, HALF)
    assert rep["intervals"] == run_intervals(run, TASKS, HALF)
    assert rep["metrics"]["LA"] == pytest.approx((2 / 3 + 1) / 2)
    assert rep["metrics"]["LA_per_task"] == pytest.approx({"A": 2 / 3, "B": 1.0})
    for key in ("AP", "LA", "forgetting"):
        lo, hi = rep["intervals"]["metrics"][key]
        assert lo <= hi
    on_disk = json.loads((run / "report" / "report.json").read_text())
    assert on_disk["intervals"]["resamples"] == 5 and on_disk["intervals"]["seed"] == 0
    md = (run / "report" / "report.md").read_text()
    lo, hi = rep["intervals"]["metrics"]["AP"]
    assert f"| AP | {rep['metrics']['AP']:.4f} | [{lo:.4f}, {hi:.4f}] |" in md
    assert "| metric | value | 50% CI | convention |" in md and "percentile bootstrap" in md
    # LA per task beside the base model's score: A 2/3 after training vs 1/3 at the base
    assert "| A | 0.6667 |" in md and "| 0.3333 | +0.3333 |" in md
    assert "zero-shot rows before task j was learned do not count" in md
