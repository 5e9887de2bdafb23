"""The constant-answer check against hand-computed cases, and its place in the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mora_dist.evaluation.answers import answer_changes, answer_checks, not_beyond_constant, task_answer_check
from mora_dist.evaluation.bootstrap import BootstrapSettings, paired_intervals
from mora_dist.evaluation.generation import TaskEval
from mora_dist.evaluation.report import rebuild_report
from mora_dist.evaluation.results import write_stage_results


def _rows(predictions, references, match=None):
    match = match or (lambda p, r: p.split(".")[0].strip().lower() == r.lower())
    return [{"prompt": f"q{i}", "prediction": p, "reference": r, "score": float(match(p, r))}
            for i, (p, r) in enumerate(zip(predictions, references))]


def test_one_answer_for_every_prompt_scores_the_majority_share():
    refs = ["C"] * 11 + ["A"] * 5 + ["B"] * 4
    check = task_answer_check(_rows(["C. neutral"] * 20, refs))
    assert check["constant_answer"] == "C" and check["constant_answer_score"] == pytest.approx(11 / 20)
    assert check["top_prediction"] == "C" and check["top_prediction_share"] == 1.0
    assert check["score"] == pytest.approx(11 / 20) and check["examples"] == 20


def test_varied_right_answers_beat_the_constant_answer():
    refs = ["Sports", "World", "Sports", "Business"]
    check = task_answer_check(_rows(["Sports", "World", "Business", "Business"], refs))
    # best single answer: "Sports" (2 of 4); the model: 3 of 4 right, "Business" its most frequent answer (2 of 4)
    assert (check["constant_answer"], check["constant_answer_score"]) == ("Sports", 0.5)
    assert (check["top_prediction"], check["top_prediction_share"], check["score"]) == ("Business", 0.5, 0.75)


def test_references_with_several_accepted_answers_and_explanations():
    # a list of accepted labels counts once per example; only a reference's first line is its label
    refs = [["yes", "true"], ["yes"], ["no"], "A\nbecause the figure shows it"]
    check = task_answer_check(_rows(["true", "yes", "no", "A"], refs, match=lambda p, r: True))
    assert (check["constant_answer"], check["constant_answer_score"]) == ("yes", 0.5)
    assert check["score"] == 1.0


def _write(run_dir, stages):
    """stages: per stage {task: (metric, predictions, references)}; stage i + 1 is after task i."""
    tasks = [next(reversed(s)) for s in stages[1:]]
    for stage, entries in enumerate(stages):
        in_domain = {}
        for task, (metric, preds, refs) in entries.items():
            rows = _rows(preds, refs)
            in_domain[task] = TaskEval(task, metric, sum(r["score"] for r in rows) / len(rows), len(rows), rows)
        write_stage_results(run_dir, stage, tasks[stage - 1] if stage else None, in_domain)
    return run_dir


def test_report_flags_a_task_learned_only_as_its_majority_label(tmp_path):
    refs_a, refs_b = ["C", "C", "C", "A"], ["World", "Sports", "World", "Business"]
    run = _write(tmp_path, [
        {"A": ("accuracy", ["x"] * 4, refs_a), "B": ("accuracy", ["x"] * 4, refs_b)},
        {"A": ("accuracy", ["C"] * 4, refs_a)},                                  # 0.75 = always "C": not learned
        {"A": ("accuracy", ["C"] * 4, refs_a), "B": ("accuracy", ["World", "Sports", "World", "x"], refs_b)},
    ])
    checks = answer_checks(run, ["A", "B"], {"A": "accuracy", "B": "accuracy"})
    assert checks["available"] and checks["tasks"]["A"]["stage"] == 1 and checks["tasks"]["B"]["stage"] == 2
    assert checks["tasks"]["A"]["beyond_constant"] is False and checks["tasks"]["B"]["beyond_constant"] is True
    assert not_beyond_constant(checks) == ["A"]
    rep = rebuild_report(run)
    assert rep["metrics"]["LA_per_task"] == {"A": 0.75, "B": 0.75}  # same LA; only B beats its constant answer
    assert rep["answers"]["tasks"]["B"]["constant_answer_score"] == 0.5
    md = (run / "report" / "report.md").read_text()
    assert "**Not learned beyond a constant answer:** A." in md
    assert "| A | 0.7500 | 0.7500 ('C') | 'C' (100%) | **no** |" in md
    assert json.loads((run / "report" / "report.json").read_text())["answers"] == rep["answers"]


def test_free_text_metrics_are_not_checked(tmp_path):
    run = _write(tmp_path, [{"A": ("rouge_l", ["x"], ["y"])}, {"A": ("rouge_l", ["y"], ["y"])}])
    checks = answer_checks(run, ["A"], {"A": "rouge_l"})
    assert checks == {"available": False, "tasks": {}, "reason": checks["reason"],
                      "changes": {"tasks": {}, "mean_share": None}}  # a one-task stream: no earlier task
    assert "label task" in checks["reason"]
    rebuild_report(run)
    assert "Constant-answer check" not in (run / "report" / "report.md").read_text()


def test_answer_changes_count_each_earlier_answer_that_the_later_tasks_replaced(tmp_path):
    refs_a, refs_b, refs_c = ["C", "C", "C", "A"], ["7", "3", "12"], ["x", "y"]
    run = _write(tmp_path, [
        {"A": ("accuracy", ["x"] * 4, refs_a)},
        {"A": ("accuracy", ["C. neutral", "C", "C", "C"], refs_a)},            # A learned as its majority label
        {"A": ("accuracy", ["A", "A", "C", "C"], refs_a), "B": ("exact", ["7 apples", "3", "5"], refs_b)},
        # after the last task: A's answers "C" again on all four (the labels it names, spelling aside), one
        # changed from "C" to "A" (2nd) then back; B: "3" -> "4" on one prompt; its first line only counts
        {"A": ("accuracy", ["C", "c!", "A. no", "C"], refs_a), "B": ("exact", ["7\nmore", "4", "5"], refs_b),
         "C": ("accuracy", ["x", "y"], refs_c)},
    ])
    changes = answer_changes(run, ["A", "B", "C"])
    # A: right after it ("C", "C", "C", "C") vs final ("C", "C", "A", "C"): 1 of 4 changed, although its score is
    # 0.75 at both stages; B: ("7", "3", "5") vs ("7", "4", "5"): 1 of 3; C is the last task
    assert changes["tasks"] == {"A": {"examples": 4, "changed": 1, "share": 0.25},
                                "B": {"examples": 3, "changed": 1, "share": 1 / 3}}
    assert changes["mean_share"] == pytest.approx((0.25 + 1 / 3) / 2)
    rep = rebuild_report(run)
    assert rep["answers"]["changes"] == changes
    md = (run / "report" / "report.md").read_text()
    assert "| A | 1 / 4 | 25% |" in md and "| B | 1 / 3 | 33% |" in md and "Mean share over these tasks: 29%." in md


def test_answer_changes_leave_out_tasks_whose_prompts_differ_between_the_stages(tmp_path):
    run = _write(tmp_path, [{"A": ("accuracy", ["x"], ["C"])}, {"A": ("accuracy", ["C"], ["C"])},
                            {"A": ("accuracy", ["A"], ["C"]), "B": ("accuracy", ["B"], ["B"])}])
    assert answer_changes(run, ["A", "B"])["tasks"]["A"]["changed"] == 1
    final = run / "eval" / "stage_02_B.samples.json"
    stored = json.loads(final.read_text())
    stored["A"][0]["prompt"] = "another prompt"
    final.write_text(json.dumps(stored))
    assert answer_changes(run, ["A", "B"]) == {"tasks": {}, "mean_share": None}


def test_answer_changes_get_paired_intervals_from_the_metrics_resamples(tmp_path):
    refs_a, refs_b = ["C", "C", "C", "A"], ["x", "y"]

    def run(name, final_a):
        return _write(tmp_path / name, [{"A": ("accuracy", ["x"] * 4, refs_a)}, {"A": ("accuracy", ["C"] * 4, refs_a)},
                                         {"A": ("accuracy", final_a, refs_a), "B": ("accuracy", ["x", "y"], refs_b)}])

    groups = {"ref": [run("ref", ["C"] * 4)], "other": [run("other", ["C", "A", "A", "C"])]}  # A: 0 and 2 of 4
    indices = [np.array([[0, 1, 2, 3], [1, 1, 2, 2]]), np.array([[0, 1], [1, 1]])]  # 2 resamples, given
    ints = paired_intervals(groups, ["A", "B"], "ref", BootstrapSettings(resamples=2), indices)
    # resampled shares of A's changed answers: ref 0, 0; other 2/4 = 0.5 and 4/4 = 1.0 (examples 1, 1, 2, 2)
    lo, hi = 0.5 + 0.025 * 0.5, 0.5 + 0.975 * 0.5  # the 2.5 % and 97.5 % points between 0.5 and 1.0
    assert ints["methods"]["ref"]["answers_changed"] == [0.0, 0.0]
    assert ints["methods"]["other"]["answers_changed"] == pytest.approx([lo, hi])
    assert ints["differences"]["other"]["answers_changed"]["interval"] == pytest.approx([lo, hi])
    assert ints["differences"]["other"]["answers_changed"]["resolved"] is True
