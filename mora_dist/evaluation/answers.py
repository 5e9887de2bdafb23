"""Is a score right after training evidence of learning, or of one answer given to every prompt?

A label task can be "learned" in a few steps by learning only the answer format and the most frequent label: the
model then answers every prompt the same way and scores the share of that label among the test examples. That
score can sit far above the base model's (which often answers in another format) without the model telling the
examples apart. This module measures it from the stored per-example predictions
(``eval/stage_XX_<name>.samples.json``) of the stage right after each task was learned (row ``j + 1``):

* ``constant_answer_score``: the best score that any single answer, given to every test example, gets on these
  examples (the candidates are the distinct references; for ``accuracy`` it is the share of the most frequent
  label), and that answer;
* ``top_prediction`` and ``top_prediction_share``: the model's most frequent answer (the label it names, as
  ``metrics.label_match`` reads it, else its normalised text) and its share;
* ``beyond_constant``: whether the score right after training exceeds the constant-answer score.

Only tasks scored with ``accuracy`` (label match, ``metrics.label_match``) are checked: for free-text metrics a
constant answer is not a meaningful baseline.

``answer_changes`` measures, from the same files, what the later tasks did to each earlier task's answers: the
share of its test prompts whose answer after the last task differs from the answer right after it was learned.
It sees interference where the scores cannot: a task learned only as its majority label has nothing to forget in
accuracy, yet a later task can replace that label on every prompt; and changes that cancel in a score still count.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from mora_dist.evaluation.metrics import label_match, normalize_label
from mora_dist.evaluation.results import stage_filename

CHECKED_METRICS = ("accuracy",)


def _reference_labels(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Normalised label -> its first spelling, over the first lines of the rows' references."""
    spelling: dict[str, str] = {}
    for row in rows:
        for x in row["reference"] if isinstance(row["reference"], list) else [row["reference"]]:
            spelling.setdefault(normalize_label(x), x.strip().splitlines()[0].strip() if x.strip() else "")
    return spelling


def answer_names(rows: Sequence[dict[str, Any]], spelling: Mapping[str, str] | None = None) -> list[str]:
    """The answer of each row: the reference label its prediction names (``metrics.label_match``), else the
    prediction's first line as ``metrics.normalize_label`` reads it. ``spelling`` (normalised label -> spelling)
    defaults to the rows' own reference labels."""
    spelling = _reference_labels(rows) if spelling is None else spelling
    labels = sorted(spelling)

    def named(prediction: str) -> str:
        label = next((x for x in labels if label_match(prediction, x)), None)
        return spelling[label] if label is not None else normalize_label(prediction)

    return [named(r["prediction"]) for r in rows]


def task_answer_check(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The constant-answer baseline and the prediction spread of one task's per-example ``rows``.

    Args:
        rows: per-example records with ``prediction``, ``reference`` (a string or a list of accepted strings)
            and ``score`` (1.0 / 0.0 under ``accuracy``).
    """
    n = len(rows)
    refs = [r["reference"] if isinstance(r["reference"], list) else [r["reference"]] for r in rows]
    spelling = _reference_labels(rows)
    labels = sorted(spelling)
    best, best_answer = 0.0, None
    for label in labels:
        score = sum(any(label_match(label, x) for x in accepted) for accepted in refs) / n
        if score > best or best_answer is None:
            best, best_answer = score, spelling[label]
    top, count = Counter(answer_names(rows, spelling)).most_common(1)[0]
    return {"examples": n, "constant_answer": best_answer, "constant_answer_score": best,
            "top_prediction": top, "top_prediction_share": count / n,
            "score": sum(float(r["score"]) for r in rows) / n}


def answer_checks(run_dir: str | os.PathLike, tasks: Sequence[str],
                  metric_names: Mapping[str, str]) -> dict[str, Any]:
    """The constant-answer check of every task of ``run_dir`` right after it was learned, and the answers changed.

    ``tasks`` is the stream and ``metric_names`` each task's metric, as ``report.load_run_dir`` reads them.

    Returns ``{"available": bool, "reason": str (when not available), "tasks": {task: check}, "changes":
    answer_changes(...)}``; each check is ``task_answer_check``'s dict plus ``stage`` and ``beyond_constant``.
    Tasks that were not evaluated right after training, have no stored predictions or are scored with a metric
    other than ``accuracy`` are left out of the check (``available`` speaks of the check only).
    """
    run_dir = Path(run_dir)
    checks: dict[str, Any] = {}
    for j, task in enumerate(tasks):
        if metric_names.get(task) not in CHECKED_METRICS:
            continue
        rows = _stage_rows(run_dir, j + 1, task, task)
        if not rows:
            continue
        check = task_answer_check(rows)
        check["stage"] = j + 1
        check["beyond_constant"] = check["score"] > check["constant_answer_score"] + 1e-12
        checks[task] = check
    changes = answer_changes(run_dir, tasks)
    if not checks:
        return {"available": False, "tasks": {}, "changes": changes,
                "reason": "no label task with per-example predictions stored right after it was learned"}
    return {"available": True, "tasks": checks, "changes": changes}


def _stage_samples(run_dir: Path, stage: int, stage_task: str) -> dict[str, list[dict[str, Any]]]:
    """Every task's stored per-example rows at ``stage`` (the stage after training ``stage_task``); {} if none."""
    samples = (run_dir / "eval" / stage_filename(stage, stage_task)).with_suffix(".samples.json")
    return json.loads(samples.read_text(encoding="utf-8")) if samples.is_file() else {}


def _stage_rows(run_dir: Path, stage: int, stage_task: str, task: str) -> list[dict[str, Any]] | None:
    """``task``'s stored per-example rows at ``stage`` (the stage after training ``stage_task``), or None."""
    return _stage_samples(run_dir, stage, stage_task).get(task) or None


def changed_answers(run_dir: str | os.PathLike, tasks: Sequence[str]) -> dict[str, list[bool]]:
    """Per earlier task, per test prompt: whether its answer after the last task differs from the answer right after
    the task was learned (an answer is what ``answer_names`` reads: the label it names, else its first line).

    Every task but the last, compared prompt by prompt (row ``j + 1`` against row ``T``). Tasks without both
    stages' predictions, or whose stored prompts differ between the two, are left out.
    """
    run_dir, T = Path(run_dir), len(tasks)
    last = _stage_samples(run_dir, T, tasks[-1])  # read once: it holds every task's final answers
    out: dict[str, list[bool]] = {}
    for j, task in enumerate(tasks[:-1]):
        after, final = _stage_rows(run_dir, j + 1, task, task), last.get(task)
        if not after or not final or [r["prompt"] for r in after] != [r["prompt"] for r in final]:
            continue
        spelling = _reference_labels(after)
        out[task] = [a != b for a, b in zip(answer_names(after, spelling), answer_names(final, spelling))]
    return out


def answer_changes(run_dir: str | os.PathLike, tasks: Sequence[str]) -> dict[str, Any]:
    """How many of each earlier task's test answers the later tasks changed (``changed_answers``, counted).

    Returns ``{"tasks": {task: {"examples", "changed", "share"}}, "mean_share": mean over those tasks or None}``.
    """
    per_task = {t: {"examples": len(c), "changed": sum(c), "share": sum(c) / len(c)}
                for t, c in changed_answers(run_dir, tasks).items()}
    shares = [c["share"] for c in per_task.values()]
    return {"tasks": per_task, "mean_share": sum(shares) / len(shares) if shares else None}


def not_beyond_constant(checks: dict[str, Any]) -> list[str]:
    """The tasks whose score right after training does not exceed the constant-answer score."""
    return [t for t, c in (checks.get("tasks") or {}).items() if not c["beyond_constant"]]
