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


# The general suite: two tasks, per-document accuracy at the base, after A and after B, in lm-eval's sample layout.
GEN_BASE = {"G1": [1, 0, 0, 1], "G2": [1, 1]}
GEN1 = [GEN_BASE, {"G1": [0, 0, 0, 0], "G2": [0, 0]}, {"G1": [1, 1, 0, 1], "G2": [0, 1]}]
GEN2 = [GEN_BASE, {"G1": [1, 1, 1, 1], "G2": [1, 1]}, {"G1": [1, 1, 1, 1], "G2": [1, 1]}]
GEN_IDX = [np.array([[0, 1, 2, 3], [1, 1, 1, 1], [0, 0, 2, 2], [1, 2, 3, 3], [3, 3, 3, 3]]),
           np.array([[0, 1], [0, 0], [1, 1], [1, 0], [0, 1]])]


def _lm_eval_general(scores: dict, docs: str = "doc") -> dict:
    """What ``run_general_suite(..., log_samples=True)`` returns, reduced to what the results files read."""
    return {"results": {t: {"alias": t, "acc,none": sum(v) / len(v), "acc_stderr,none": "N/A"} for t, v in scores.items()},
            "samples": {t: [{"doc_id": i, "doc_hash": f"{docs}-{t}-{i}", "filter": "none", "acc": float(x),
                             "doc": {"q": i}} for i, x in reversed(list(enumerate(v)))] for t, v in scores.items()}}


def _write_general_run(run_dir, general_stages, docs: str = "doc"):
    for stage, (scores, general) in enumerate(zip(RUN1, general_stages)):
        in_domain = {t: TaskEval(t, "accuracy", sum(v) / len(v), len(v),
                                 [{"prompt": f"{t} question {i}", "reference": "x", "prediction": "x", "score": float(x)}
                                  for i, x in enumerate(v)]) for t, v in scores.items()}
        write_stage_results(run_dir, stage, TASKS[stage - 1] if stage else None, in_domain,
                            _lm_eval_general(general, docs))
    return run_dir


def test_general_change_intervals_equal_the_hand_computed_resamples(tmp_path):
    from mora_dist.evaluation.bootstrap import general_intervals, load_general_scores
    from mora_dist.evaluation.report import rebuild_report

    run = _write_general_run(tmp_path / "g1", GEN1)
    stored = json.loads((run / "eval" / "stage_02_B.general.samples.json").read_text())
    assert stored["G1"]["metric"] == "acc,none" and [d["doc_id"] for d in stored["G1"]["examples"]] == [0, 1, 2, 3]
    assert "samples" not in json.loads((run / "eval" / "stage_02_B.json").read_text())
    assert load_general_scores(run, 2).counts == [4, 2]
    # final - base per document: G1 [0, 1, 0, 0], G2 [-1, 0]. Per resample, G1: 1/4, 1, 0, 1/4, 0;
    # G2: -1/2, -1, 0, -1/2, -1/2; the mean of the two: -1/8, 0, 0, -1/8, -1/4.
    gi = general_intervals(run, 2, HALF, indices=GEN_IDX)
    assert gi["available"] and gi["stage"] == 2 and gi["examples"] == {"G1": 4, "G2": 2}
    assert gi["change"] == pytest.approx([-1 / 8, 0])
    assert gi["change_per_task"]["G1"] == pytest.approx([0, 1 / 4])
    assert gi["change_per_task"]["G2"] == pytest.approx([-1 / 2, -1 / 2])
    # a stage between the base and the last without its file (evaluated before they were kept): the same interval
    (run / "eval" / "stage_01_A.general.samples.json").unlink()
    assert general_intervals(run, 2, HALF, indices=GEN_IDX) == gi
    # the report: the change after the last task, its interval and the in-domain intervals unchanged
    ints = run_intervals(run, TASKS, HALF, indices=IDX, general_idx=GEN_IDX)
    assert ints["general"] == gi and ints["metrics"]["AP"] == pytest.approx([1 / 2, 2 / 3])
    rep = rebuild_report(run, HALF)
    md = (run / "report" / "report.md").read_text()
    # point estimate: G1 3/4 - 1/2 = +1/4, G2 1/2 - 1 = -1/2, mean -1/8
    assert rep["general"]["change_from_base"][2] == pytest.approx([1 / 4, -1 / 2])
    lo, hi = rep["intervals"]["general"]["change"]  # the seeded draw's
    assert f"Mean change after B (mean over the general tasks): -0.1250 [{lo:+.4f}, {hi:+.4f}]" in md
    assert "G1 +0.2500 [" in md and "G2 -0.5000 [" in md


def test_paired_general_change_and_its_absence(tmp_path):
    d1, d2 = _write_general_run(tmp_path / "m1", GEN1), _write_general_run(tmp_path / "m2", GEN2)
    out = paired_intervals({"m1": [d1], "m2": [d2]}, TASKS, "m1", HALF, indices=IDX, general_idx=GEN_IDX)
    # m2 per resample: G1 d = [0, 1, 1, 0] -> 1/2, 1, 1/2, 1/2, 0; G2 d = [0, 0] -> 0; mean 1/4, 1/2, 1/4, 1/4, 0.
    # m2 - m1: 3/8, 1/2, 1/4, 3/8, 1/4.
    assert out["general"]["available"] and out["general"]["examples"] == {"G1": 4, "G2": 2}
    assert out["methods"]["m2"]["general_change"] == pytest.approx([1 / 4, 1 / 4])
    assert out["methods"]["m1"]["general_change"] == pytest.approx([-1 / 8, 0])
    diff = out["differences"]["m2"]["general_change"]
    assert diff["interval"] == pytest.approx([1 / 4, 3 / 8]) and diff["resolved"]
    assert out["differences"]["m2"]["AP"]["interval"] == pytest.approx([0, 0])  # both runs' in-domain scores: RUN1
    # compare.md's interval tables gain a general column and its difference (values as build_comparison sets them)
    from mora_dist.compare_render import _intervals_section

    for per_metric in out["differences"].values():
        for entry in per_metric.values():
            entry["value"] = 0.0
    md = "\n".join(_intervals_section({"intervals": out}))
    assert "| method | AP | BWT | BWT_trace | FWT | forgetting | LA | general Δ |" in md
    assert [r for r in md.splitlines() if r.startswith("| m2 |")][0].endswith(" [+0.250, +0.250] |")
    assert "Δ(general Δ) |" in md and "+0.0000 [+0.250, +0.375] **✓ resolved** |" in md
    assert "documents per task: G1 4, G2 2" in md
    # other documents in one run: no general interval, with the reason; the in-domain intervals stand
    d3 = _write_general_run(tmp_path / "m3", GEN2, docs="other")
    other = paired_intervals({"m1": [d1], "m3": [d3]}, TASKS, "m1", HALF, indices=IDX)
    assert not other["general"]["available"] and "other general tasks or documents" in other["general"]["reason"]
    assert "general_change" not in other["differences"]["m3"] and other["differences"]["m3"]["AP"]["interval"]
    # a run evaluated without per-document scores (older runs): the same
    (d3 / "eval" / "stage_00_base.general.samples.json").unlink()
    missing = paired_intervals({"m1": [d1], "m3": [d3]}, TASKS, "m1", HALF)
    assert not missing["general"]["available"] and "stage_00_base.general.samples.json" in missing["general"]["reason"]
    assert run_intervals(d3, TASKS, HALF)["general"]["available"] is False
    # a stored general score that is not the mean of its documents
    path = d1 / "eval" / "stage_02_B.general.samples.json"
    data = json.loads(path.read_text())
    data["G2"]["examples"][0]["score"] = 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not the mean of its per-document scores"):
        paired_intervals({"m1": [d1], "m2": [d2]}, TASKS, "m1", HALF)


def test_shared_base_copies_the_general_documents(tmp_path):
    """The runs of a comparison share the base evaluation: the copy carries the per-document scores too, so the
    paired general interval of a copied run is available."""
    from mora_dist.run.shared_base import copy_base

    source = _write_general_run(tmp_path / "first", GEN1)
    target = tmp_path / "second"
    copy_base(source, target)
    for name in ("stage_00_base.samples.json", "stage_00_base.general.samples.json"):
        assert json.loads((target / "eval" / name).read_text()) == json.loads((source / "eval" / name).read_text())
