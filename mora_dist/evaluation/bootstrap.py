"""Confidence intervals for the continual-learning metrics: a paired bootstrap over test examples.

Every in-domain metric of this package is the mean of a per-example score (accuracy, exact number, ROUGE-L, edit
similarity, and SARI, which ``metrics.sari`` averages per sentence), and each evaluation stores those per-example
scores beside its results (``eval/stage_XX_<name>.samples.json``). A task's test examples are drawn once with a
fixed seed, so every stage of a run, and every run of a comparison, scores the same examples. The bootstrap
therefore resamples *examples*:

* per task ``j`` with ``n_j`` examples, ``B`` resamples of ``n_j`` indices drawn with replacement (seeded);
* the same indices for every row of the score matrix (the stages of one run), and for every run being compared
  (paired: a difference is measured on the same resampled examples for both methods);
* each resample gives a matrix of per-example means, hence AP, BWT, BWT_trace, forgetting, LA and FWT
  (``forgetting.batch_metrics``, vectorised over the ``B`` matrices);
* the interval is the percentile interval: the ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles of the ``B``
  values (numpy's default linear interpolation between order statistics).

A difference is *resolved* by the data when its interval excludes 0. Runs whose examples differ (another
``eval.max_examples`` or ``eval.seed``, or another data set) cannot be paired: that is an error naming both.

The share of the earlier tasks' answers that the later tasks changed (``answers.changed_answers``: per earlier
task's example, changed or not) is resampled with the same indices as that task's scores, so its intervals and
its differences between methods are paired the same way.

The general-capability change (the mean over the general-suite tasks of the score at the last evaluated stage
minus the base model's) gets the same treatment from the per-document scores that the evaluate stage stores
(``eval/stage_XX_<name>.general.samples.json``): documents resampled per general task with their own seeded
draw, the same documents for both stages and for every run. Runs evaluated without those files (older runs) or
on other documents get no general interval, with the reason, while their other intervals stand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mora_dist.evaluation.answers import changed_answers
from mora_dist.evaluation.forgetting import METRIC_NAMES, batch_metrics

# How far a stored score may sit from the mean of its stored per-example scores (JSON round trip, float sums).
_MEAN_TOLERANCE = 1e-6


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are computed.

    Attributes:
        resamples: number of bootstrap resamples ``B``.
        confidence: coverage of the percentile interval, in (0, 1).
        seed: seed of the resampling (the same seed and example counts give the same resamples).
    """

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.resamples, int) or self.resamples < 1:
            raise ValueError(f"bootstrap resamples must be an integer >= 1, got {self.resamples!r}")
        if not 0.0 < float(self.confidence) < 1.0:
            raise ValueError(f"bootstrap confidence must lie strictly between 0 and 1, got {self.confidence!r}")

    def to_dict(self) -> dict:
        """JSON-able form, with the method named."""
        return {"method": "percentile bootstrap over test examples, resampled per task, paired across stages "
                          "and runs", "resamples": self.resamples, "confidence": self.confidence, "seed": self.seed}


@dataclass
class ExampleScores:
    """Per-example scores of one run.

    Attributes:
        source: the run directory (for error messages).
        tasks: the stream, in training order.
        scores: per task, a ``(T + 1, n_j)`` array: row ``i`` holds the per-example scores at stage ``i``
            (0 = base model), all NaN where the task was not evaluated at that stage.
        keys: per task, one identity string per example (prompt and reference), in evaluation order.
    """

    source: str
    tasks: list[str]
    scores: list[np.ndarray]
    keys: list[list[str]]

    @property
    def counts(self) -> list[int]:
        """Examples per task."""
        return [len(k) for k in self.keys]


class MissingExampleScores(Exception):
    """A run has no per-example scores for some evaluated entry (older runs, or results written without them)."""


def _example_key(row: Mapping) -> str:
    return json.dumps([row.get("prompt"), row.get("reference")], ensure_ascii=False)


def load_example_scores(run_dir: str | os.PathLike, tasks: Sequence[str]) -> ExampleScores:
    """The per-example scores of every stage of ``run_dir`` for the stream ``tasks``.

    Raises:
        MissingExampleScores: an evaluated (stage, task) has no stored per-example scores.
        ValueError: a task was evaluated on different examples at different stages, or a stored score is not
            the mean of its per-example scores.
    """
    folder = Path(run_dir) / "eval"
    T = len(tasks)
    column = {t: j for j, t in enumerate(tasks)}
    rows: dict[int, dict[str, list]] = {}
    keys: list[list[str] | None] = [None] * T
    first_seen: list[str] = [""] * T
    for path in sorted(p for p in folder.glob("stage_*.json") if not p.name.endswith(".samples.json")):
        info = json.loads(path.read_text(encoding="utf-8")).get("mora_dist") or {}
        stage, in_domain = info.get("stage"), info.get("in_domain") or {}
        if not isinstance(stage, int) or not 0 <= stage <= T:
            continue
        wanted = [t for t in in_domain if t in column]
        if not wanted:
            continue
        sample_path = path.with_suffix(".samples.json")
        if not sample_path.is_file():
            raise MissingExampleScores(f"{sample_path}: no per-example scores stored for stage {stage}")
        samples = json.loads(sample_path.read_text(encoding="utf-8"))
        for task in wanted:
            examples = samples.get(task)
            if examples is None:
                raise MissingExampleScores(f"{sample_path}: no per-example scores for task {task!r}")
            j = column[task]
            these = [_example_key(e) for e in examples]
            if keys[j] is None:
                keys[j], first_seen[j] = these, sample_path.name
            elif these != keys[j]:
                raise ValueError(f"{sample_path}: task {task!r} was scored on other examples than in "
                                 f"{first_seen[j]}; intervals need the same test examples at every stage "
                                 "(keep eval.max_examples, eval.seed and the data fixed within a run)")
            values = [float(e["score"]) for e in examples]
            stored = float(in_domain[task]["score"])
            if values and abs(sum(values) / len(values) - stored) > _MEAN_TOLERANCE:
                raise ValueError(f"{path}: the score of {task!r} ({stored}) is not the mean of its per-example "
                                 f"scores in {sample_path.name} ({sum(values) / len(values)}); the bootstrap "
                                 "resamples per-example scores and needs a metric that is their mean")
            rows.setdefault(stage, {})[task] = values
    scores = []
    for j, task in enumerate(tasks):
        n = len(keys[j] or [])
        arr = np.full((T + 1, n), np.nan)
        for stage, by_task in rows.items():
            if task in by_task:
                arr[stage] = by_task[task]
        scores.append(arr)
    return ExampleScores(str(run_dir), list(tasks), scores, [k or [] for k in keys])


@dataclass
class GeneralScores(ExampleScores):
    """Per-document scores of the general suite in one run: ``ExampleScores`` whose tasks are the general tasks (in
    the order first evaluated), with ``(T + 1, n_g)`` arrays (NaN rows: not evaluated) and, as keys, lm-eval's
    ``doc_id`` and ``doc_hash`` of each document."""

    def last_stage(self) -> int | None:
        """The last stage after the base at which every general task was scored (None: only the base, or none)."""
        scored = [i for i in range(self.scores[0].shape[0]) if all(not np.isnan(a[i]).any() for a in self.scores)] \
            if self.scores else []
        return scored[-1] if len(scored) > 1 and scored[0] == 0 else None


def load_general_scores(run_dir: str | os.PathLike, T: int) -> GeneralScores:
    """The general suite's per-document scores at every stage of ``run_dir`` (a stream of ``T`` tasks).

    Stages between the base and the last one with general scores may lack their per-document file (runs
    evaluated in part before these files were kept); those rows stay NaN.

    Raises:
        MissingExampleScores: the base or the last stage that scored the general suite stored no per-document
            scores, or a stored file lacks a task.
        ValueError: a general task was scored on other documents at another stage, or a stored score is not the
            mean of its per-document scores.
    """
    from mora_dist.evaluation.results import general_samples_path

    folder = Path(run_dir) / "eval"
    tasks: list[str] = []
    rows: dict[str, dict[int, list[float]]] = {}
    keys: dict[str, list[str]] = {}
    first_seen: dict[str, str] = {}
    missing: dict[int, Path] = {}
    last = 0
    for path in sorted(p for p in folder.glob("stage_*.json") if not p.name.endswith(".samples.json")):
        info = json.loads(path.read_text(encoding="utf-8")).get("mora_dist") or {}
        stage, general = info.get("stage"), info.get("general") or {}
        if not isinstance(stage, int) or not 0 <= stage <= T or not general:
            continue
        sample_path = general_samples_path(path)
        last = max(last, stage)
        if not sample_path.is_file():
            missing[stage] = sample_path
            continue
        samples = json.loads(sample_path.read_text(encoding="utf-8"))
        for task, entry in general.items():
            if task not in samples:
                raise MissingExampleScores(f"{sample_path}: no per-document scores for general task {task!r}")
            docs = samples[task]["examples"]
            these = [f"{d['doc_id']}:{d.get('doc_hash', '')}" for d in docs]
            if task not in keys:
                tasks.append(task)
                keys[task], first_seen[task] = these, sample_path.name
            elif these != keys[task]:
                raise ValueError(f"{sample_path}: general task {task!r} was scored on other documents than in "
                                 f"{first_seen[task]} (keep eval.general_limit fixed within a run)")
            values = [float(d["score"]) for d in docs]
            if values and abs(sum(values) / len(values) - float(entry["score"])) > _MEAN_TOLERANCE:
                raise ValueError(f"{path}: the general score of {task!r} ({entry['score']}) is not the mean of its "
                                 f"per-document scores in {sample_path.name} ({sum(values) / len(values)})")
            rows.setdefault(task, {})[stage] = values
    for stage in (0, last):  # what the change from the base at the last stage needs; other stages may lack them
        if stage in missing:
            raise MissingExampleScores(f"{missing[stage]}: no per-document scores of the general suite stored for "
                                       f"stage {stage} (evaluations written before they were kept have none)")
    scores = []
    for task in tasks:
        arr = np.full((T + 1, len(keys[task])), np.nan)
        for stage, values in rows[task].items():
            arr[stage] = values
        scores.append(arr)
    return GeneralScores(str(run_dir), tasks, scores, [keys[t] for t in tasks])


def general_indices(counts: Sequence[int], settings: BootstrapSettings) -> list[np.ndarray]:
    """Per general task, a ``(B, n_g)`` array of document indices drawn with replacement; seeded apart from the
    in-domain draw (``resample_indices``), which therefore does not depend on the general suite."""
    return _draw(counts, settings.resamples, np.random.default_rng([settings.seed, 1]))


def general_change_replicates(run: GeneralScores, indices: Sequence[np.ndarray], stage: int) -> dict:
    """Resampled general-capability change at ``stage`` from the base: ``{"change": (B,), "per_task": {g: (B,)}}``;
    ``change`` is the mean over the general tasks of each task's change."""
    per_task = {}
    for task, scores, idx in zip(run.tasks, run.scores, indices):
        means = _weights(idx, scores.shape[1]) @ scores[[0, stage]].T  # (B, 2): base, stage
        per_task[task] = means[:, 1] - means[:, 0]
    return {"change": np.mean(list(per_task.values()), axis=0), "per_task": per_task}


def _general_intervals(reps: Mapping[str, Any], confidence: float) -> dict:
    return {"change": percentile_interval(reps["change"], confidence),
            "change_per_task": {t: percentile_interval(v, confidence) for t, v in reps["per_task"].items()}}


def general_intervals(run_dir: str | os.PathLike, T: int, settings: BootstrapSettings = BootstrapSettings(),
                      indices: Sequence[np.ndarray] | None = None) -> dict:
    """Intervals of one run's general-capability change from the base at its last stage with general scores.

    Returns ``{"available": True, "stage", "examples": {task: n}, "change": [lo, hi], "change_per_task"}`` or
    ``{"available": False, "reason"}``.
    """
    try:
        run = load_general_scores(run_dir, T)
    except MissingExampleScores as err:
        return {"available": False, "reason": str(err)}
    stage = run.last_stage()
    if stage is None:
        return {"available": False, "reason": "no general-suite scores at the base and a later stage"}
    reps = general_change_replicates(run, general_indices(run.counts, settings) if indices is None else indices,
                                     stage)
    return {"available": True, "stage": stage, "examples": dict(zip(run.tasks, run.counts)),
            **_general_intervals(reps, settings.confidence)}


def check_paired(runs: Mapping[str, ExampleScores]) -> None:
    """Raise ``ValueError`` unless every run has the same stream and, per task, the same examples in order."""
    items = list(runs.items())
    name0, ref = items[0]
    for name, other in items[1:]:
        if other.tasks != ref.tasks:
            raise ValueError(f"{other.source} ({name}) and {ref.source} ({name0}) do not share one stream: "
                             f"{other.tasks} vs {ref.tasks}")
        for j, task in enumerate(ref.tasks):
            if other.keys[j] != ref.keys[j]:
                raise ValueError(f"task {task!r}: {other.source} ({name}) was evaluated on other test examples than "
                                 f"{ref.source} ({name0}) ({other.counts[j]} vs {ref.counts[j]} examples); a paired "
                                 "comparison needs the same eval.split, eval.max_examples, eval.seed and data")


def resample_indices(counts: Sequence[int], settings: BootstrapSettings) -> list[np.ndarray]:
    """Per task, a ``(B, n_j)`` array of indices drawn with replacement from ``range(n_j)``, seeded."""
    return _draw(counts, settings.resamples, np.random.default_rng(settings.seed))


def _draw(counts: Sequence[int], resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per count ``n``, a ``(resamples, n)`` array of indices drawn with replacement from ``range(n)``."""
    return [rng.integers(0, n, size=(resamples, n)) if n else np.zeros((resamples, 0), int) for n in counts]


def _weights(indices: np.ndarray, n: int) -> np.ndarray:
    """``(B, n)`` resampling weights: how often each example was drawn, divided by ``n`` (rows sum to 1)."""
    B = indices.shape[0]
    flat = (indices + n * np.arange(B)[:, None]).ravel()
    return np.bincount(flat, minlength=B * n).reshape(B, n) / n


def resampled_matrices(run: ExampleScores, indices: Sequence[np.ndarray]) -> np.ndarray:
    """``(B, T + 1, T)`` score matrices of the resampled examples (NaN where a task was not evaluated)."""
    T = len(run.tasks)
    B = indices[0].shape[0]
    out = np.full((B, T + 1, T), np.nan)
    for j, (scores, idx) in enumerate(zip(run.scores, indices)):
        n = scores.shape[1]
        if n == 0:
            continue
        evaluated = ~np.isnan(scores).any(axis=1)
        means = _weights(idx, n) @ np.where(evaluated[:, None], scores, 0.0).T  # (B, T + 1)
        out[:, :, j] = np.where(evaluated[None, :], means, np.nan)
    return out


def percentile_interval(values: np.ndarray, confidence: float) -> list[float] | None:
    """``[lo, hi]``: the ``(1 - c)/2`` and ``(1 + c)/2`` quantiles of the finite ``values``; None if there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [50.0 * (1.0 - confidence), 50.0 * (1.0 + confidence)])
    return [float(lo), float(hi)]


def replicate_metrics(run: ExampleScores, indices: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """``batch_metrics`` of every resampled matrix: ``{metric: (B,)}`` and ``LA_per_task: (B, T)``."""
    return batch_metrics(resampled_matrices(run, indices))


def intervals_of(replicates: Mapping[str, np.ndarray], tasks: Sequence[str], confidence: float) -> dict:
    """Percentile intervals of replicated metrics: ``{metric: [lo, hi] | None, "LA_per_task": {task: ...}}``."""
    out: dict = {k: percentile_interval(replicates[k], confidence) for k in METRIC_NAMES}
    out["LA_per_task"] = {t: percentile_interval(replicates["LA_per_task"][:, j], confidence)
                          for j, t in enumerate(tasks)}
    return out


def run_intervals(run_dir: str | os.PathLike, tasks: Sequence[str],
                  settings: BootstrapSettings = BootstrapSettings(),
                  indices: Sequence[np.ndarray] | None = None,
                  general_idx: Sequence[np.ndarray] | None = None) -> dict:
    """The report's ``intervals`` section for one run directory.

    ``indices`` (per task a ``(B, n_j)`` array) and ``general_idx`` (per general task a ``(B, n_g)`` array) replace
    the seeded draws, to reproduce given resamples.

    Returns ``{"available": True, **settings, "examples": {task: n}, "metrics": {metric: [lo, hi], ...},
    "general": general_intervals(...)}``, or ``{"available": False, "reason": ...}`` when the run stored no
    per-example scores.
    """
    try:
        run = load_example_scores(run_dir, tasks)
    except MissingExampleScores as err:
        return {"available": False, "reason": str(err)}
    reps = replicate_metrics(run, resample_indices(run.counts, settings) if indices is None else indices)
    return {"available": True, **settings.to_dict(), "examples": dict(zip(run.tasks, run.counts)),
            "metrics": intervals_of(reps, run.tasks, settings.confidence),
            "general": general_intervals(run_dir, len(tasks), settings, general_idx)}


def excludes_zero(interval: Sequence[float] | None) -> bool:
    """Whether an interval lies wholly on one side of 0 (the difference is resolved by the data)."""
    return interval is not None and (interval[0] > 0.0 or interval[1] < 0.0)


def paired_intervals(groups: Mapping[str, Sequence[str | os.PathLike]], tasks: Sequence[str], reference: str,
                     settings: BootstrapSettings = BootstrapSettings(),
                     indices: Sequence[np.ndarray] | None = None,
                     general_idx: Sequence[np.ndarray] | None = None) -> dict:
    """Intervals for a comparison of methods, each run with one or more seeds, on the same test examples.

    Args:
        groups: ``{method: [run_dir per seed]}``; every run must have scored the same examples.
        tasks: the stream.
        reference: the method the others are compared with (differences are ``method - reference``).
        settings: resamples, confidence, seed.
        indices: per task a ``(B, n_j)`` array that replaces the seeded draw (to reproduce given resamples).
        general_idx: per general task a ``(B, n_g)`` array that replaces the seeded draw of documents.

    Returns:
        ``{"available": True, **settings, "examples", "reference", "methods": {method: intervals of the metric
        (its mean over seeds)}, "differences": {method: {metric: {"interval": [lo, hi], "resolved": bool}}},
        "general": {"available", "examples" or "reason"}}``, or ``{"available": False, "reason"}`` when some run
        stored no per-example scores. The same resampled examples serve every run, so each difference's interval
        is that of a paired difference. With general intervals available, ``methods[m]`` and ``differences[m]``
        also hold ``general_change`` (the change after the last task, from the base).
    """
    try:
        runs = {(m, i): load_example_scores(d, tasks) for m, dirs in groups.items() for i, d in enumerate(dirs)}
    except MissingExampleScores as err:
        return {"available": False, "reason": str(err)}
    check_paired({f"{m} #{i}": r for (m, i), r in runs.items()})
    first = next(iter(runs.values()))
    if indices is None:
        indices = resample_indices(first.counts, settings)
    mean_reps: dict[str, dict[str, np.ndarray]] = {}
    for method, dirs in groups.items():
        per_seed = [replicate_metrics(runs[(method, i)], indices) for i in range(len(dirs))]
        mean_reps[method] = {k: np.mean([r[k] for r in per_seed], axis=0) for k in per_seed[0]}
    methods = {m: intervals_of(r, tasks, settings.confidence) for m, r in mean_reps.items()}
    differences = {}
    for method, reps in mean_reps.items():
        if method == reference:
            continue
        diff = {k: reps[k] - mean_reps[reference][k] for k in reps}
        ints = intervals_of(diff, tasks, settings.confidence)
        differences[method] = {k: {"interval": ints[k], "resolved": excludes_zero(ints[k])} for k in METRIC_NAMES}
    general = _paired_general(groups, len(tasks), reference, settings, general_idx)
    if general["available"]:
        for method in groups:
            methods[method]["general_change"] = general["methods"][method]
            if method != reference:
                differences[method]["general_change"] = general["differences"][method]
    changes = _paired_answer_changes(groups, tasks, reference, settings.confidence, indices)
    if changes is not None:
        for method in groups:
            methods[method]["answers_changed"] = changes["methods"][method]
            if method != reference:
                differences[method]["answers_changed"] = changes["differences"][method]
    return {"available": True, **settings.to_dict(), "examples": dict(zip(tasks, first.counts)),
            "reference": reference, "methods": methods, "differences": differences,
            "general": {k: v for k, v in general.items() if k not in ("methods", "differences")}}


def _paired_answer_changes(groups: Mapping[str, Sequence[str | os.PathLike]], tasks: Sequence[str], reference: str,
                           confidence: float, indices: Sequence[np.ndarray]) -> dict | None:
    """Paired intervals of the mean share of earlier tasks' answers changed by the later tasks (over seeds), per
    method and method - reference; None unless every run has it for the same tasks on the scored examples."""
    changed = {(m, i): changed_answers(d, tasks) for m, dirs in groups.items() for i, d in enumerate(dirs)}
    names = list(next(iter(changed.values())))
    counts = dict(zip(tasks, (idx.shape[1] for idx in indices)))
    if not names or any(list(c) != names or any(len(c[t]) != counts[t] for t in names) for c in changed.values()):
        return None
    col = {t: tasks.index(t) for t in names}

    def replicates(c: Mapping[str, list[bool]]) -> np.ndarray:  # (B,) mean share over the earlier tasks
        return np.mean([_weights(indices[col[t]], counts[t]) @ np.asarray(c[t], float) for t in names], axis=0)

    mean = {m: np.mean([replicates(changed[(m, i)]) for i in range(len(dirs))], axis=0) for m, dirs in groups.items()}
    differences = {}
    for method, v in mean.items():
        if method != reference:
            interval = percentile_interval(v - mean[reference], confidence)
            differences[method] = {"interval": interval, "resolved": excludes_zero(interval)}
    return {"methods": {m: percentile_interval(v, confidence) for m, v in mean.items()}, "differences": differences}


def _paired_general(groups: Mapping[str, Sequence[str | os.PathLike]], T: int, reference: str,
                    settings: BootstrapSettings, indices: Sequence[np.ndarray] | None) -> dict:
    """Paired intervals of the general-capability change: per method (mean over seeds) and method - reference."""
    try:
        runs = {(m, i): load_general_scores(d, T) for m, dirs in groups.items() for i, d in enumerate(dirs)}
    except MissingExampleScores as err:
        return {"available": False, "reason": str(err)}
    first = next(iter(runs.values()))
    if not first.tasks:
        return {"available": False, "reason": "no general suite in these runs"}
    for (m, _), run in runs.items():
        if run.tasks != first.tasks or run.keys != first.keys:
            return {"available": False, "reason": f"{run.source} ({m}) scored other general tasks or documents than "
                                                  f"{first.source}; a paired interval needs the same eval.general "
                                                  "and eval.general_limit"}
        if run.last_stage() != T:
            return {"available": False, "reason": f"{run.source} ({m}): no general-suite scores after the last task"}
    if indices is None:
        indices = general_indices(first.counts, settings)
    mean_change = {}
    for method, dirs in groups.items():
        per_seed = [general_change_replicates(runs[(method, i)], indices, T)["change"] for i in range(len(dirs))]
        mean_change[method] = np.mean(per_seed, axis=0)
    methods = {m: percentile_interval(v, settings.confidence) for m, v in mean_change.items()}
    differences = {}
    for method, v in mean_change.items():
        if method != reference:
            interval = percentile_interval(v - mean_change[reference], settings.confidence)
            differences[method] = {"interval": interval, "resolved": excludes_zero(interval)}
    return {"available": True, "examples": dict(zip(first.tasks, first.counts)), "methods": methods,
            "differences": differences}
