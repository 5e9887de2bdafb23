"""Continual-learning report: score matrix, forgetting metrics, general capability, expert usage; JSON, Markdown, PNG.

Input of ``build_report`` (plain JSON-able data, or a run directory, see below)::

    {
      "tasks": ["C-STANCE", "FOMC", ...],          # the stream, in training order (T names)
      "in_domain": [ {"C-STANCE": 0.31, ...},      # T+1 dicts: [0] = base model, [i+1] = after task i;
                     ... ],                         #   a task missing from a dict (or null) = not evaluated
      "metric_names": {"C-STANCE": "accuracy"},    # optional: metric per task, shown in the tables
      "general": [ {"local_arc_easy": 0.52, ...},  # optional: T+1 dicts of general-suite scores, same stages
                   ... ],
      "experts": {"C-STANCE": {                     # optional: per trained task
          "summary": {"active_blocks": 12, "pruned_blocks": 4, ...},   # scalars shown in a table
          "usage": {"attn": [0.9, 0.1, ...], "mlp": [...]},          # per layer group: share of gate weight
                                                                       #   per block
          "usage_per_expert": {"attn": [0.11, 0.02, ...]},           # optional: that share / experts in block
          "blocks": ["b0", "b1", ...]}},                              # optional block names (x-axis labels)
      "title": "..."                                # optional
    }

``"matrix"`` (T+1 rows x T columns, null where not evaluated) may be given instead of ``"in_domain"``.

Outputs in ``out_dir``: ``report.json`` (``tasks``, ``matrix``, ``metrics`` with ``LA_per_task`` and
``conventions``, ``intervals`` (bootstrap confidence intervals of every metric, see ``bootstrap``; available when
built from a run directory whose evaluations stored per-example scores; ``intervals.general``: of the
general-capability change at the last stage, from the stored per-document scores), ``general`` {``names``, ``matrix``,
``change_from_base``}, ``experts``, ``answers`` (built from a run directory: the constant-answer check of
``answers``, whether each label task's score right after training beats one answer given to every prompt)),
``report.md`` (the same tables, readable alone) and
figures ``accuracy_matrix.png``, ``task_curves.png``, ``general_curves.png`` (when general scores exist) and
``expert_usage_<group>.png`` per layer group (when usage data exist: the share of gate weight per block and,
beside it, the mean weight per expert of the block), and ``loss_curves.png`` (the training loss per step, a panel
per task, from a run directory's ``metrics.jsonl``).

``rebuild_report(run_dir)`` reads the per-stage files ``<run_dir>/eval/stage_XX_<name>.json`` written by
``results.write_stage_results`` (XX = 00 for the base model, i + 1 after task i; only their ``mora_dist`` section is
read: ``after_task``, ``in_domain``, ``general``, ``experts``) and writes the report to ``<run_dir>/report/``.
The stream is the ``after_task`` of stages 1..T in stage order; a missing stage becomes a row of nulls.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mora_dist.evaluation.answers import answer_checks, not_beyond_constant
from mora_dist.evaluation.bootstrap import BootstrapSettings, run_intervals
from mora_dist.evaluation.forgetting import FORGETTING_CONVENTIONS, forgetting_metrics, learning_accuracy_per_task
from mora_dist.evaluation.results import read_stage_results
from mora_dist.io import atomic_write_json, atomic_write_text

Row = list[float | None]


def _num(value: Any) -> float | None:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return None
    return float(value)


def _matrix_from_stages(names: Sequence[str], stages: Sequence[Mapping[str, Any] | None]) -> list[Row]:
    return [[_num((stage or {}).get(n)) for n in names] for stage in stages]


def normalize_input(data: Mapping[str, Any]) -> dict:
    """Validate the ``build_report`` input and return ``tasks``, ``matrix``, general names and matrix, experts."""
    tasks = list(data.get("tasks") or [])
    if not tasks:
        raise ValueError("report input needs 'tasks': the stream's task names in training order")
    T = len(tasks)
    if "matrix" in data:
        matrix = [[_num(v) for v in row] for row in data["matrix"]]
    elif "in_domain" in data:
        matrix = _matrix_from_stages(tasks, data["in_domain"])
    else:
        raise ValueError("report input needs 'in_domain' (T+1 dicts of scores) or 'matrix' (T+1 rows)")
    if len(matrix) != T + 1 or any(len(row) != T for row in matrix):
        raise ValueError(f"score matrix must be {T + 1} rows (base + one per task) x {T} tasks, got "
                         f"{len(matrix)} rows of lengths {sorted({len(r) for r in matrix})}")
    general = data.get("general") or []
    if general and len(general) != T + 1:
        raise ValueError(f"'general' must hold T+1={T + 1} stage dicts, got {len(general)}")
    gnames: list[str] = []
    for stage in general:
        gnames += [k for k in (stage or {}) if k not in gnames]
    return {"title": data.get("title", "Continual-learning report"), "tasks": tasks, "matrix": matrix,
            "metric_names": dict(data.get("metric_names") or {}), "general_names": gnames,
            "general_matrix": _matrix_from_stages(gnames, general) if general else [],
            "experts": dict(data.get("experts") or {})}


def stage_labels(tasks: Sequence[str]) -> list[str]:
    """Row labels: ``base`` then ``after <task>``."""
    return ["base"] + [f"after {t}" for t in tasks]


def _change(matrix: list[Row]) -> list[Row]:
    base = matrix[0]
    return [[None if v is None or b is None else v - b for v, b in zip(row, base)] for row in matrix]


def compute_report(data: Mapping[str, Any], intervals: Mapping[str, Any] | None = None,
                   answers: Mapping[str, Any] | None = None) -> dict:
    """The ``report.json`` content for ``data`` (see the module docstring), the metrics' ``intervals`` and the
    constant-answer ``answers`` check (``answers.answer_checks``)."""
    d = normalize_input(data)
    metrics: dict[str, Any] = forgetting_metrics(d["matrix"])
    metrics["LA_per_task"] = dict(zip(d["tasks"], learning_accuracy_per_task(d["matrix"])))
    metrics["conventions"] = dict(FORGETTING_CONVENTIONS)
    if intervals is None:
        intervals = {"available": False, "reason": "built from scores alone, without per-example scores"}
    general = {"names": d["general_names"], "matrix": d["general_matrix"],
               "change_from_base": _change(d["general_matrix"]) if d["general_matrix"] else []}
    return {"title": d["title"], "tasks": d["tasks"], "stages": stage_labels(d["tasks"]),
            "metric_names": d["metric_names"], "matrix": d["matrix"], "metrics": metrics,
            "intervals": dict(intervals), "general": general, "experts": d["experts"],
            "answers": dict(answers or {"available": False, "tasks": {},
                                        "reason": "built from scores alone, without per-example predictions"})}


# ------------------------------------------------------------------------------------------------- markdown
def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    v = v + 0.0  # no "-0.0000"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _ci(interval: Sequence[float] | None, signed: bool = False) -> str:
    return "–" if interval is None else f"[{_fmt(interval[0], signed)}, {_fmt(interval[1], signed)}]"


def _metric_tables(rep: dict) -> list[str]:
    """The metrics with their intervals and conventions, and learning accuracy per task beside the base score."""
    m, ints = rep["metrics"], rep.get("intervals") or {}
    ci = ints.get("metrics") if ints.get("available") else None
    level = f"{100 * ints['confidence']:g}% CI" if ci else "CI"
    out = _table(["metric", "value", level, "convention"],
                 [[k, _fmt(m[k], signed=k in ("BWT", "FWT")), _ci(ci[k] if ci else None, signed=k in ("BWT", "FWT")),
                   m["conventions"][k]] for k in FORGETTING_CONVENTIONS])
    if ci:
        out += ["", f"Intervals: {100 * ints['confidence']:g}% percentile bootstrap over the test examples "
                    f"({ints['resamples']} resamples, seed {ints['seed']}; examples per task: "
                    + ", ".join(f"{t} {n}" for t, n in ints["examples"].items())
                    + "), the same resampled examples at every stage."]
    else:
        out += ["", f"No intervals: {ints.get('reason', 'not computed')}."]
    base = rep["matrix"][0]
    out += ["", "Learning accuracy per task (score right after training on it) and its gain over the base model:", ""]
    out += _table(["task", "LA (R[j+1][j])", level, "base (R[0][j])", "gain"],
                  [[t, _fmt(m["LA_per_task"][t]), _ci(ci["LA_per_task"].get(t) if ci else None), _fmt(base[j]),
                    _fmt(None if m["LA_per_task"][t] is None or base[j] is None else m["LA_per_task"][t] - base[j],
                         signed=True)] for j, t in enumerate(rep["tasks"])])
    answers = rep.get("answers") or {}
    return out + _answer_table(answers) + _changes_table(answers.get("changes") or {})


def _general_interval_lines(rep: dict, stages: Sequence[str]) -> list[str]:
    """The general-capability change at the last stage with its bootstrap interval, overall and per task."""
    ints = rep.get("intervals") or {}
    gi = ints.get("general") or {}
    if not ints.get("available") or not gi:
        return []
    if not gi.get("available"):
        return ["", f"No interval for the general-capability change: {gi.get('reason')}."]
    g, stage = rep["general"], gi["stage"]
    changes = [v for v in g["change_from_base"][stage] if v is not None]
    mean = sum(changes) / len(changes) if changes else None
    per_task = ", ".join(f"{t} {_fmt(v, signed=True)} {_ci(gi['change_per_task'].get(t), signed=True)}"
                         for t, v in zip(g["names"], g["change_from_base"][stage]) if t in gi["change_per_task"])
    return ["", f"Mean change {stages[stage]} (mean over the general tasks): {_fmt(mean, signed=True)} "
                f"{_ci(gi['change'], signed=True)}, a {100 * ints['confidence']:g}% percentile bootstrap over the "
                "documents (" + ", ".join(f"{t} {n}" for t, n in gi["examples"].items())
                + "), the same documents at both stages; per task: " + per_task + "."]


def _answer_table(answers: Mapping[str, Any]) -> list[str]:
    """The constant-answer check: does each label task's score right after training beat a single answer?"""
    checks = answers.get("tasks") or {}
    if not checks:
        return []
    out = ["", "Constant-answer check (label tasks, right after training each): the best score one answer given to "
               "every test prompt gets (the most frequent reference), and the model's most frequent answer. A score "
               "that does not exceed the constant answer's is no evidence that the task was learned, whatever its "
               "gain over the base model.", ""]
    out += _table(["task", "LA", "constant answer: score (answer)", "most frequent prediction (share)",
                   "beyond a constant answer"],
                  [[t, _fmt(c["score"]), f"{_fmt(c['constant_answer_score'])} ({c['constant_answer']!r})",
                    f"{c['top_prediction']!r} ({100 * c['top_prediction_share']:.0f}%)",
                    "yes" if c["beyond_constant"] else "**no**"] for t, c in checks.items()])
    flat = not_beyond_constant(answers)
    if flat:
        out += ["", f"**Not learned beyond a constant answer:** {', '.join(flat)}."]
    return out


def _changes_table(changes: Mapping[str, Any]) -> list[str]:
    """How many of each earlier task's answers the later tasks changed (``answers.answer_changes``)."""
    per_task = changes.get("tasks") or {}
    if not per_task:
        return []
    out = ["", "Answers changed by the later tasks: each earlier task's test prompts whose answer after the last task "
               "differs from the answer right after it was learned (the label an answer names, else its first "
               "line). It counts interference that the scores hide: changes that cancel, and a learned constant "
               "answer replaced by another.", ""]
    out += _table(["task", "changed / examples", "share"],
                  [[t, f"{c['changed']} / {c['examples']}", f"{100 * c['share']:.0f}%"] for t, c in per_task.items()])
    return out + ["", f"Mean share over these tasks: {100 * changes['mean_share']:.0f}%."]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(rep: dict, figures: Sequence[str]) -> str:
    """``report.md``: matrix, metrics with their conventions, general capability, experts, figure links."""
    tasks, stages = rep["tasks"], rep["stages"]
    header = ["stage \\ task"] + [f"{t} ({rep['metric_names'][t]})" if t in rep["metric_names"] else t
                                  for t in tasks]
    out = [f"# {rep['title']}", "", f"Stream of T={len(tasks)} tasks: {', '.join(tasks)}.", "",
           "## In-domain score matrix", "",
           "Row 0 is the base model before training; row i+1 is after training tasks 0..i. '–' = not evaluated.",
           ""]
    out += _table(header, [[s] + [_fmt(v) for v in row] for s, row in zip(stages, rep["matrix"])])
    out += ["", "## Continual-learning metrics", ""]
    out += _metric_tables(rep)
    g = rep["general"]
    if g["names"]:
        out += ["", "## General capability", ""]
        out += _table(["stage"] + g["names"], [[s] + [_fmt(v) for v in row] for s, row in zip(stages, g["matrix"])])
        out += ["", "Change from the base model:", ""]
        out += _table(["stage"] + g["names"],
                      [[s] + [_fmt(v, signed=True) for v in row] for s, row in zip(stages, g["change_from_base"])])
        out += _general_interval_lines(rep, stages)
    if rep["experts"]:
        keys: list[str] = []
        for info in rep["experts"].values():
            keys += [k for k in (info.get("summary") or {}) if k not in keys]
        if keys:
            out += ["", "## Experts per task", ""]
            out += _table(["task"] + keys, [[t] + [str((info.get("summary") or {}).get(k, "–")) for k in keys]
                                            for t, info in rep["experts"].items()])
    if figures:
        out += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_heatmap(fig, ax, values: list[Row], rows: Sequence[str], cols: Sequence[str], title: str, xlabel: str,
                  ylabel: str, cbar_label: str, annotate: bool) -> None:
    import numpy as np

    plt = _plt()
    arr = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    finite = arr[np.isfinite(arr)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar_label)
    if annotate and arr.size <= 400:
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                v = arr[i, j]
                text = "–" if np.isnan(v) else (f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}")
                dark = not np.isnan(v) and (v - vmin) / (vmax - vmin) < 0.5
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")


def _heatmap(values: list[Row], rows: Sequence[str], cols: Sequence[str], title: str, xlabel: str, ylabel: str,
             cbar_label: str, path: Path, annotate: bool = True) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cols) + 3), max(3.0, 0.5 * len(rows) + 2)))
    _draw_heatmap(fig, ax, values, rows, cols, title, xlabel, ylabel, cbar_label, annotate)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _usage_panels(shares: list[Row], per_expert: list[Row] | None, rows: Sequence[str], cols: Sequence[str],
                  group: str, path: Path, annotate: bool) -> Path:
    """Expert usage of a layer group: each block's share of the gate weight (left) and that share per expert of
    the block (right), so that routing is not confused with block size after pruning."""
    plt = _plt()
    panels = [(shares, "share of gate weight", "share")]
    if per_expert is not None:
        panels.append((per_expert, "mean weight per expert (share / experts)", "share per expert"))
    w, h = max(5.0, 0.9 * len(cols) + 3), max(3.0, 0.5 * len(rows) + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(w * len(panels), h), squeeze=False)
    for ax, (values, title, label) in zip(axes[0], panels):
        _draw_heatmap(fig, ax, values, rows, cols, f"{group}: {title}", "rank block (expert)", "task", label,
                      annotate)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curves(matrix: list[Row], names: Sequence[str], stages: Sequence[str], title: str, ylabel: str,
            path: Path, mark_trained: bool) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(stages) + 3), 4.5))
    for j, name in enumerate(names):
        pts = [(i, row[j]) for i, row in enumerate(matrix) if row[j] is not None]
        if not pts:
            continue
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if mark_trained and j + 1 < len(matrix) and matrix[j + 1][j] is not None:
            ax.plot([j + 1], [matrix[j + 1][j]], marker="*", markersize=14, color=line.get_color())
    ax.set_xticks(range(len(stages)), labels=list(stages), rotation=30, ha="right")
    ax.set_xlabel("stage of the stream"), ax.set_ylabel(ylabel), ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_figures(rep: dict, out_dir: Path) -> list[Path]:
    """Write the report's PNGs into ``out_dir``; returns their paths."""
    figs = [_heatmap(rep["matrix"], rep["stages"], rep["tasks"], "In-domain score matrix", "evaluated task",
                     "model after training", "score", out_dir / "accuracy_matrix.png"),
            _curves(rep["matrix"], rep["tasks"], rep["stages"], "Per-task score across the stream (* = just trained)",
                    "in-domain score", out_dir / "task_curves.png", mark_trained=True)]
    g = rep["general"]
    if g["names"]:
        figs.append(_curves(g["matrix"], g["names"], rep["stages"], "General capability across the stream",
                            "general-suite score", out_dir / "general_curves.png", mark_trained=False))
    groups: list[str] = []
    for info in rep["experts"].values():
        groups += [k for k in (info.get("usage") or {}) if k not in groups]
    for group in groups:
        tasks = [t for t, info in rep["experts"].items() if group in (info.get("usage") or {})]
        width = max(len(rep["experts"][t]["usage"][group]) for t in tasks)

        def padded(key):
            return [[_num(v) for v in r] + [None] * (width - len(r))
                    for r in (list((rep["experts"][t].get(key) or {}).get(group) or []) for t in tasks)]

        has_per_expert = all(group in (rep["experts"][t].get("usage_per_expert") or {}) for t in tasks)
        names = next((list(rep["experts"][t]["blocks"]) for t in tasks
                      if len(rep["experts"][t].get("blocks") or []) == width), [str(b) for b in range(width)])
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", group)
        figs.append(_usage_panels(padded("usage"), padded("usage_per_expert") if has_per_expert else None, tasks,
                                  names, group, out_dir / f"expert_usage_{safe}.png", annotate=width <= 16))
    return figs


def build_report(run_dir_or_data: str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike,
                 bootstrap: BootstrapSettings = BootstrapSettings()) -> dict:
    """Write ``report.json``, ``report.md`` and the PNGs to ``out_dir``; returns the ``report.json`` content.

    Args:
        run_dir_or_data: the input dict documented in the module docstring, or a run directory whose
            ``eval/stage_XX_<name>.json`` files are read (see ``load_run_dir``); only a run directory has the
            per-example scores that the confidence intervals resample.
        out_dir: folder for the outputs (created).
        bootstrap: resamples, confidence and seed of the intervals.
    """
    intervals = answers = None
    if isinstance(run_dir_or_data, (str, os.PathLike)):
        data = load_run_dir(run_dir_or_data)
        intervals = run_intervals(run_dir_or_data, data["tasks"], bootstrap)
        answers = answer_checks(run_dir_or_data, data["tasks"], data["metric_names"])
    else:
        data = run_dir_or_data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = compute_report(data, intervals, answers)
    figures = render_figures(rep, out)
    if isinstance(run_dir_or_data, (str, os.PathLike)):  # the training curves of RUN_DIR/metrics.jsonl
        from mora_dist.run.curves import plot_loss_curves

        figures += [f for f in [plot_loss_curves(run_dir_or_data, out)] if f is not None]
    rep["figures"] = [p.name for p in figures]
    atomic_write_json(out / "report.json", rep)
    atomic_write_text(out / "report.md", render_markdown(rep, figures))
    return rep


def load_run_dir(run_dir: str | os.PathLike) -> dict:
    """The ``build_report`` input assembled from ``<run_dir>/eval/stage_XX_<name>.json`` files."""
    stages = read_stage_results(run_dir)
    by_index = {s["mora_dist"]["stage"]: s["mora_dist"] for s in stages}
    T = max(by_index)
    if T < 1:
        raise ValueError(f"{run_dir}: only the base stage was evaluated; the report needs at least one task")
    tasks = [(by_index.get(i) or {}).get("after_task") or f"task_{i - 1}" for i in range(1, T + 1)]
    in_domain, general, metric_names, experts = [], [], {}, {}
    for i in range(T + 1):
        info = by_index.get(i) or {}
        in_domain.append({t: v["score"] for t, v in (info.get("in_domain") or {}).items()})
        general.append({t: v["score"] for t, v in (info.get("general") or {}).items()})
        for t, v in (info.get("in_domain") or {}).items():
            metric_names.setdefault(t, v["metric"].split(",")[0])
        if i >= 1 and info.get("experts"):
            experts[tasks[i - 1]] = info["experts"]
    data = {"tasks": tasks, "in_domain": in_domain, "metric_names": metric_names, "experts": experts,
            "title": f"Continual-learning report: {Path(run_dir).name}"}
    if any(general):
        data["general"] = general
    return data


def rebuild_report(run_dir: str | os.PathLike, bootstrap: BootstrapSettings = BootstrapSettings()) -> dict:
    """Rebuild ``<run_dir>/report/`` from the stage results files in ``<run_dir>/eval/``."""
    return build_report(run_dir, Path(run_dir) / "report", bootstrap)


if __name__ == "__main__":  # python -m mora_dist.evaluation.report RUN_DIR
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m mora_dist.evaluation.report RUN_DIR")
    print(rebuild_report(sys.argv[1])["metrics"])
