"""``compare.md`` and ``compare.png`` from the ``compare.json`` content built by ``mora_dist.compare``.

One seed per method: the metric values, their paired-bootstrap intervals and the differences from the reference
method. Several seeds: the same with mean ± standard deviation [minimum, maximum] over seeds, the bootstrap
intervals of the mean over seeds, and one row per method and seed.
"""

from __future__ import annotations

from pathlib import Path

from mora_dist.evaluation.answers import not_beyond_constant
from mora_dist.evaluation.forgetting import METRIC_NAMES

SIGNED = ("BWT", "FWT")


def fmt(v, signed: bool = False, digits: int = 4) -> str:
    """A number for a table: ``–`` for None, thousands separators for ints, no ``-0.0000``."""
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    v = v + 0.0
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def table(header, rows) -> list[str]:
    """A Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _ci(interval, signed: bool = False) -> str:
    return "–" if interval is None else f"[{fmt(interval[0], signed, 3)}, {fmt(interval[1], signed, 3)}]"


def _spread(s: dict, signed: bool = False) -> str:
    if s["mean"] is None:
        return "–"
    std = f" ± {s['std']:.4f}" if s["std"] is not None else ""
    return f"{fmt(s['mean'], signed)}{std} [{fmt(s['min'], signed, 3)}, {fmt(s['max'], signed, 3)}]"


def _views(comp: dict) -> tuple[dict, dict]:
    """(one run per method for settings, costs and samples; the metric cell text per method and metric)."""
    if "seeds" not in comp:
        runs = comp["runs"]
        cells = {m: {k: fmt(r["metrics"][k], k in SIGNED) for k in METRIC_NAMES}
                 | {"general": fmt(r["general_change"], True)} for m, r in runs.items()}
        return runs, cells
    runs = {m: next(iter(sr.values())) for m, sr in comp["seed_runs"].items()}
    cells = {m: {k: _spread(a[k], k in SIGNED) for k in METRIC_NAMES} | {"general": _spread(a["general_change"], True)}
             for m, a in comp["aggregate"].items()}
    return runs, cells


def _intervals_section(comp: dict) -> list[str]:
    ints, multi = comp["intervals"], "seeds" in comp
    if not ints.get("available"):
        return [f"No confidence intervals: {ints.get('reason')}."]
    level = f"{100 * ints['confidence']:g}%"
    of = "of the mean over seeds " if multi else ""
    out = [f"{level} percentile intervals {of}from a paired bootstrap over the test examples ({ints['resamples']} "
           f"resamples, seed {ints['seed']}; examples per task: "
           + ", ".join(f"{t} {n}" for t, n in ints["examples"].items())
           + "): the same resampled examples for every stage and every method.", ""]
    general = ints.get("general") or {}
    keys = list(METRIC_NAMES) + (["general_change"] if general.get("available") else [])
    heads = {k: "general Δ" if k == "general_change" else k for k in keys}
    out += table(["method"] + [heads[k] for k in keys],
                 [[m] + [_ci(v[k], k in SIGNED or k == "general_change") for k in keys]
                  for m, v in ints["methods"].items()])
    if general.get("available"):
        out += ["", "General Δ: documents of the general suite resampled the same way (its own seeded draw; "
                    "documents per task: " + ", ".join(f"{t} {n}" for t, n in general["examples"].items()) + ")."]
    elif general:
        out += ["", f"No interval for the general Δ: {general.get('reason')}."]
    ref = ints["reference"]
    if not ints["differences"]:
        return out
    out += ["", f"## Differences from {ref}", "",
            f"Each cell: (method − {ref}){' averaged over seeds' if multi else ''} and its {level} paired interval. "
            "**✓ resolved**: the interval excludes 0, so these test examples resolve the difference; "
            "*not resolved*: the interval includes 0.", ""]

    def cell(e, k):
        mark = "**✓ resolved**" if e["resolved"] else "*not resolved*"
        return "–" if e["interval"] is None else f"{fmt(e['value'], True)} {_ci(e['interval'], True)} {mark}"

    out += table(["method"] + ["Δ(general Δ)" if k == "general_change" else f"Δ{k}" for k in keys],
                 [[m] + [cell(d[k], k) for k in keys] for m, d in ints["differences"].items()])
    if multi:
        out += ["", "The same differences over seeds (mean ± standard deviation [minimum, maximum]):", ""]
        out += table(["method"] + ["Δ(general Δ)" if k == "general_change" else f"Δ{k}" for k in keys],
                     [[m] + [_spread(d[k], True) for k in keys]
                      for m, d in comp["aggregate_differences"].items()])
    return out


def _named_runs(comp: dict) -> dict:
    """Every run of the comparison by a display name: the method, or "method (seed s)" with several seeds."""
    if "seeds" in comp:
        return {f"{m} (seed {seed})": r for m, sr in comp["seed_runs"].items() for seed, r in sr.items()}
    return comp["runs"]


def _constant_answers(comp: dict) -> list[str]:
    """Which (method, task) scored right after training no better than one answer given to every prompt."""
    runs = _named_runs(comp)
    if not any((r.get("answers") or {}).get("available") for r in runs.values()):
        return []
    flat = {m: tasks for m, r in runs.items() if (tasks := not_beyond_constant(r.get("answers") or {}))}
    if not flat:
        return ["", "Every label task scored, right after training, above the best single answer given to every "
                    "prompt (the constant-answer check of each run's report)."]
    return ["", "**Not learned beyond a constant answer** (the score right after training does not exceed that of "
                "the best single answer given to every prompt; see the constant-answer check of each run's "
                "report): " + "; ".join(f"{m}: {', '.join(t)}" for m, t in flat.items()) + "."]


def _answer_changes(comp: dict) -> list[str]:
    """Per method (and seed): the share of each earlier task's answers that the later tasks changed."""
    runs = _named_runs(comp)
    changes = {m: (r.get("answers") or {}).get("changes") or {} for m, r in runs.items()}
    if not any(c.get("tasks") for c in changes.values()):
        return []
    earlier = comp["tasks"][:-1]

    def cell(c: dict | None) -> str:
        return "–" if c is None else f"{100 * c['share']:.0f}% ({c['changed']}/{c['examples']})"

    out = ["", "## Answers changed by the later tasks", "",
           "Share of each earlier task's test prompts whose answer after the last task differs from the answer "
           "right after the task was learned (the label an answer names, else its first line): interference that "
           "the scores hide, as changes that cancel or a learned constant answer replaced by another.", ""]
    out += table(["method"] + earlier + ["mean"],
                 [[m] + [cell((c.get("tasks") or {}).get(t)) for t in earlier]
                  + ["–" if c.get("mean_share") is None else f"{100 * c['mean_share']:.0f}%"]
                  for m, c in changes.items()])
    return out + _answer_change_intervals(comp)


def _answer_change_intervals(comp: dict) -> list[str]:
    """The mean share's paired intervals per method and the differences from the reference, when computed."""
    ints = comp["intervals"]
    methods = {m: i["answers_changed"] for m, i in (ints.get("methods") or {}).items() if "answers_changed" in i}
    if not ints.get("available") or not methods or any(i is None for i in methods.values()):
        return []

    def pct(v: float, signed: bool = False) -> str:  # percent, or signed percentage points to one decimal
        return f"{100 * v + 0.0:+.1f}" if signed else f"{100 * v:.0f}"

    over = " (the mean over seeds)" if "seeds" in comp else ""
    out = ["", f"Mean share{over} with its {100 * ints['confidence']:g}% paired bootstrap interval (the test "
               "examples resampled as for the metrics): "
           + "; ".join(f"{m} [{pct(i[0])}%, {pct(i[1])}%]" for m, i in methods.items()) + "."]
    diffs = {m: d["answers_changed"] for m, d in (ints.get("differences") or {}).items() if "answers_changed" in d}
    if diffs:
        out += ["", f"Difference from {comp['reference']} (percentage points): " + "; ".join(
            f"{m} {'–' if d.get('value') is None else pct(d['value'], True)} "
            f"[{pct(d['interval'][0], True)}, {pct(d['interval'][1], True)}] "
            + ("**✓ resolved**" if d["resolved"] else "*not resolved*") for m, d in diffs.items()) + "."]
    return out


def render_markdown(comp: dict) -> str:
    """``compare.md``: metrics (over seeds), intervals, differences, learning accuracy, cost, settings, samples."""
    runs, cells = _views(comp)
    tasks, multi = comp["tasks"], "seeds" in comp
    first = next(iter(runs.values()))
    if multi:
        intro = (f"Stream: {' → '.join(tasks)}. Training seeds {', '.join(map(str, comp['seeds']))} (one run per "
                 f"method and seed); the same data order within a seed, and the same test examples for every run "
                 f"(eval seed {first['seeds']['eval']}).")
    else:
        intro = (f"Stream: {' → '.join(tasks)}. Same data order and seeds for every method (train seed "
                 f"{first['seeds']['train']}, eval seed {first['seeds']['eval']}).")
    out = ["# Method comparison", "", intro, "", "## Continual-learning metrics", ""]
    out += table(["method"] + list(METRIC_NAMES) + ["general Δ"],
                 [[m] + [c[k] for k in METRIC_NAMES] + [c["general"]] for m, c in cells.items()])
    if multi:
        out += ["", f"Mean ± standard deviation over the {len(comp['seeds'])} seeds [minimum, maximum]."]
    out += ["", "General Δ: mean change of the general-suite scores from the base model after the last task. LA: "
                "learning accuracy, the score on each task right after training on it.", "",
            "## Confidence intervals", ""]
    out += _intervals_section(comp)
    out += ["", "## Learning accuracy per task", "", "Score on each task right after training on it (R[j+1][j])"
            + (", mean ± standard deviation over seeds [minimum, maximum]." if multi else "."), ""]
    if multi:
        out += table(["method"] + tasks, [[m] + [_spread(a["LA_per_task"][t]) for t in tasks]
                                          for m, a in comp["aggregate"].items()])
    else:
        out += table(["method"] + tasks, [[m] + [fmt(r["LA_per_task"].get(t)) for t in tasks]
                                          for m, r in runs.items()])
    out += _constant_answers(comp)
    out += _answer_changes(comp)
    out += ["", "## Cost", ""] + (["Times of the first seed's run.", ""] if multi else [])
    out += table(["method", "trainable params / task", "adapter params", "active params / token", "train s",
                  "total s", "pruning"],
                 [[m, fmt(r["params"]["trainable_params_per_task"]), fmt(r["params"]["adapter_params"]),
                   fmt(r["params"]["active_params_per_token"]), f"{r['time_s']['train']:.1f}",
                   f"{r['time_s']['total']:.1f}", "on" if r["prune_enabled"] else "off"] for m, r in runs.items()])
    out += ["", "## Settings", ""]
    out += table(["method", "gate", "r_task", "experts kept / token", "O-LoRA λ_orth / λ_l2", "lr", "steps / epochs"],
                 [[m, "none (LoRA)" if r["settings"]["gate"] == "none" else r["settings"]["gate"],
                   r["settings"]["r_task"],
                   (f"top-{r['settings']['router_top_k']} tasks" if r["settings"]["gate"] == "router" else
                    (f"k={r['settings']['k']}" if r["settings"]["gate"] == "self" else "all")),
                   (f"{r['settings']['olora']['lambda_orth']} / {r['settings']['olora']['lambda_l2']}"
                    if r["settings"]["olora"] else "–"), r["settings"]["lr"],
                   r["settings"]["max_steps"] if r["settings"]["max_steps"] else r["settings"]["epochs"]]
                  for m, r in runs.items()])
    if comp.get("method_overrides"):
        out += ["", "Each method's own settings on top of the shared config (`--method-override`): " + "; ".join(
            f"{m}: {', '.join(f'`{o}`' for o in v)}" for m, v in comp["method_overrides"].items()) + "."]
    out += ["", "## Final score per task", ""]
    if multi:
        out += table(["method", "seed"] + tasks, [[m, s] + [fmt(r["final_scores"][t]) for t in tasks]
                                                  for m, sr in comp["seed_runs"].items() for s, r in sr.items()])
    else:
        out += table(["method"] + tasks, [[m] + [fmt(r["final_scores"][t]) for t in tasks] for m, r in runs.items()])
    out += ["", "## Samples", ""]
    out += table(["method", "train examples", "train steps", "train tokens", "eval examples"],
                 [[m] + [" / ".join(str(r["samples"][key][t]) for t in tasks)
                         for key in ("train_examples", "train_steps", "train_tokens", "eval_examples")]
                  for m, r in runs.items()])
    out += ["", "Per task, in stream order."]
    if multi:
        out += ["", "## Per seed", ""]
        out += table(["method", "seed"] + list(METRIC_NAMES) + ["general Δ", "run directory"],
                     [[m, s] + [fmt(r["metrics"][k], k in SIGNED) for k in METRIC_NAMES]
                      + [fmt(r["general_change"], True), r["run_dir"]]
                      for m, sr in comp["seed_runs"].items() for s, r in sr.items()])
    out += ["", "## Conventions", ""]
    out += [f"* **{k}**: {v}" for k, v in comp["conventions"].items()]
    out += ["", "![comparison](compare.png)"]
    return "\n".join(out) + "\n"


def _seed_runs_and_intervals(comp: dict) -> tuple[dict, dict | None]:
    """``{method: {seed: run}}`` (one unnamed seed without ``--seeds``) and the per-method bootstrap intervals
    (``None`` without them)."""
    seed_runs = comp.get("seed_runs") or {m: {"": r} for m, r in comp["runs"].items()}
    return seed_runs, comp["intervals"].get("methods") if comp["intervals"].get("available") else None


def _seed_mean(runs: dict, key: str) -> float | None:
    """The mean of metric ``key`` over one method's runs by seed (``None`` where no run has it)."""
    v = [r["metrics"][key] for r in runs.values() if r["metrics"][key] is not None]
    return sum(v) / len(v) if v else None


def plane_points(comp: dict) -> dict:
    """Each method's point in the plasticity / stability plane: ``{method: {forgetting, LA, forgetting_ci, LA_ci}}``.

    Means over seeds; the intervals are the bootstrap's (``None`` without one), clipped to contain the point.
    Methods without a forgetting value (a one-task stream) are left out.
    """
    seed_runs, ints = _seed_runs_and_intervals(comp)
    points = {}
    for m, runs in seed_runs.items():
        point = {}
        for key in ("forgetting", "LA"):
            point[key] = _seed_mean(runs, key)
            ci = (ints or {}).get(m, {}).get(key)
            point[f"{key}_ci"] = None if ci is None or point[key] is None else \
                (min(ci[0], point[key]), max(ci[1], point[key]))
        if point["forgetting"] is not None and point["LA"] is not None:
            points[m] = point
    return points


def render_figure(comp: dict, path: Path) -> Path:
    """Final score per task per method (grouped bars; mean over seeds), AP / BWT per method, and each method in the
    plane of plasticity (learning accuracy LA) against stability (forgetting).

    The AP / BWT bars and the LA / forgetting points carry the bootstrap intervals as error bars when there are any:
    a method that forgets little because it learns little shows low on the plane, not only left.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = comp["tasks"]
    seed_runs, ints = _seed_runs_and_intervals(comp)
    names = list(seed_runs)
    points = plane_points(comp)  # none for a one-task stream: no third panel
    fig, axes = plt.subplots(1, 3 if points else 2,
                             figsize=(max(9.0, 1.2 * len(tasks) * len(names) / 2 + 6) + (4.5 if points else 0), 4.5))
    ax1, ax2 = axes[:2]
    width = 0.8 / len(names)
    for i, m in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(tasks))]
        finals = [[r["final_scores"][t] or 0.0 for r in seed_runs[m].values()] for t in tasks]
        ax1.bar(xs, [sum(v) / len(v) for v in finals], width, label=m)
    ax1.set_xticks(range(len(tasks)), labels=tasks, rotation=30, ha="right")
    ax1.set_ylabel("score after the last task"), ax1.set_title("Final score per task")
    ax1.legend(fontsize=8)
    for i, (key, label) in enumerate((("AP", "AP"), ("BWT", "BWT (Lopez-Paz)"))):
        xs = [j + (i - 0.5) * 0.4 for j in range(len(names))]
        values = [0.0 if (v := _seed_mean(seed_runs[m], key)) is None else v for m in names]
        err = None
        if ints and all(ints[m][key] is not None for m in names):
            err = [[max(v - ints[m][key][0], 0.0) for v, m in zip(values, names)],
                   [max(ints[m][key][1] - v, 0.0) for v, m in zip(values, names)]]
        ax2.bar(xs, values, 0.4, label=label, yerr=err, capsize=3)
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_xticks(range(len(names)), labels=names)
    ax2.set_title("AP and BWT per method" + (" (bootstrap intervals)" if ints else "")), ax2.legend(fontsize=8)
    for m, pt in points.items():  # each method in the colour of its bars
        xerr, yerr = ([[pt[k] - pt[f"{k}_ci"][0]], [pt[f"{k}_ci"][1] - pt[k]]] if pt[f"{k}_ci"] else None
                      for k in ("forgetting", "LA"))
        axes[2].errorbar([pt["forgetting"]], [pt["LA"]], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=m,
                         color=f"C{names.index(m)}")
    if points:
        axes[2].set_xlabel("forgetting (lower: more stable)")
        axes[2].set_ylabel("learning accuracy LA (higher: more plastic)")
        axes[2].set_title("Plasticity against forgetting"), axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
