"""Per-checkpoint results files in lm-eval's own layout, covering in-domain tasks and the general suite.

One file per evaluated stage: ``<run_dir>/eval/stage_XX_<name>.json`` where ``XX`` is the two-digit stage index
(00 = base model before any training, ``i + 1`` = after training task ``i`` of the stream) and ``<name>`` is
``base`` or the task just trained (characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``).

The file is what lm-eval's ``simple_evaluate`` returns for the general suite (``results``, ``group_subtasks``,
``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``config``, ``date``, ...) with the
in-domain tasks added as further entries of the same tables (metric key ``"<metric>,none"``, e.g.
``"accuracy,none"``, output type ``generate_until``), plus one extra top-level section that lm-eval does not
write::

    "mora_dist": {"stage": 3, "after_task": "FOMC",
                  "in_domain": {"FOMC": {"metric": "accuracy,none", "score": 0.61, "n": 100}, ...},
                  "general": {"local_arc_easy": {"metric": "acc,none", "score": 0.52}, ...},
                  "experts": {...} or null}

which is all ``report.rebuild_report`` reads. Per-example predictions, when given, go beside it as
``stage_XX_<name>.samples.json``; when the general suite ran with lm-eval's ``log_samples``, each document's score
of its task's primary metric goes to ``stage_XX_<name>.general.samples.json``::

    {"local_arc_easy": {"metric": "acc,none",
                        "examples": [{"doc_id": 0, "doc_hash": "...", "score": 1.0}, ...]}, ...}

(the bootstrap intervals of the general-capability change resample those documents). Every write is atomic
(temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mora_dist.evaluation.suite import primary_metric
from mora_dist.io import atomic_write_json, read_json

IN_DOMAIN_VERSION = 1.0
GENERAL_SAMPLES_SUFFIX = ".general.samples.json"
_LM_EVAL_TABLES = ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def stage_filename(stage: int, name: str | None) -> str:
    """``stage_XX_<name>.json`` for stage index ``stage`` (0 = base)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name or "base")
    return f"stage_{stage:02d}_{safe}.json"


def general_samples_path(stage_file: str | os.PathLike) -> Path:
    """``stage_XX_<name>.general.samples.json`` beside a stage's ``stage_XX_<name>.json``."""
    path = Path(stage_file)
    return path.with_name(path.name[:-len(".json")] + GENERAL_SAMPLES_SUFFIX)


def general_example_scores(general: Mapping[str, Any] | None) -> dict:
    """Per general task, each document's score of the task's primary metric, from lm-eval's logged samples.

    ``general`` is ``run_general_suite``'s result with ``log_samples``; tasks without logged samples (or without a
    primary metric in their samples) are left out. Documents come in ``doc_id`` order.
    """
    out: dict = {}
    logged = (general or {}).get("samples") or {}
    for task, values in (general or {}).get("results", {}).items():
        key = primary_metric(task, values)
        if key is None or not logged.get(task):
            continue
        metric, _, filter_key = key.partition(",")
        rows = [s for s in logged[task] if s.get("filter", filter_key) == filter_key and metric in s]
        if not rows:
            continue
        rows.sort(key=lambda s: s["doc_id"])
        out[task] = {"metric": key, "examples": [{"doc_id": int(s["doc_id"]), "doc_hash": str(s.get("doc_hash", "")),
                                                  "score": float(s[metric])} for s in rows]}
    return out


def _in_domain_entry(value: Any) -> tuple[str, float, int]:
    """``(metric, score, n)`` from a ``TaskEval`` or a dict with ``metric``/``score``/``n``."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return str(value["metric"]), float(value["score"]), int(value.get("n", 0))


def build_stage_results(stage: int, after_task: str | None, in_domain: Mapping[str, Any] | None = None,
                        general: Mapping[str, Any] | None = None, experts: Mapping[str, Any] | None = None,
                        config: Mapping[str, Any] | None = None) -> dict:
    """One stage's results dict in lm-eval's layout (see the module docstring).

    Args:
        stage: 0 for the base model, ``i + 1`` after training task ``i``.
        after_task: name of the task just trained (``None`` for the base model).
        in_domain: ``{task: TaskEval or {"metric", "score", "n"}}``.
        general: lm-eval's results dict from ``run_general_suite`` (copied, not modified).
        experts: optional JSON-able expert statistics of this checkpoint.
        config: extra run settings merged into the ``config`` section.
    """
    out: dict = copy.deepcopy({k: v for k, v in general.items() if k != "samples"}) if general else {}
    for table in _LM_EVAL_TABLES:
        out.setdefault(table, {})
    out.setdefault("config", {})
    out["config"] = {**out["config"], **dict(config or {})}
    out.setdefault("date", time.time())
    general_summary = {}
    for task, values in (general or {}).get("results", {}).items():
        key = primary_metric(task, values)
        if key is not None and isinstance(values.get(key), (int, float)):
            general_summary[task] = {"metric": key, "score": float(values[key])}
    in_domain_summary = {}
    for task, value in (in_domain or {}).items():
        metric, score, n = _in_domain_entry(value)
        key = f"{metric},none"
        out["results"][task] = {"alias": task, "name": task, "sample_len": n, key: score,
                                f"{metric}_stderr,none": "N/A"}
        out["configs"][task] = {"task": task, "output_type": "generate_until", "num_fewshot": 0,
                                "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True}],
                                "metadata": {"version": IN_DOMAIN_VERSION, "source": "mora_dist in-domain"}}
        out["versions"][task] = IN_DOMAIN_VERSION
        out["n-shot"][task] = 0
        out["higher_is_better"][task] = {metric: True}
        out["n-samples"][task] = {"original": n, "effective": n}
        in_domain_summary[task] = {"metric": key, "score": score, "n": n}
    out["mora_dist"] = {"stage": int(stage), "after_task": after_task, "in_domain": in_domain_summary,
                        "general": general_summary, "experts": copy.deepcopy(experts) if experts else None}
    return out


def write_stage_results(run_dir: str | os.PathLike, stage: int, after_task: str | None,
                        in_domain: Mapping[str, Any] | None = None, general: Mapping[str, Any] | None = None,
                        experts: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                        write_samples: bool = True) -> Path:
    """Build and atomically write ``<run_dir>/eval/stage_XX_<name>.json``; returns its path.

    With ``write_samples``, per-example predictions of ``TaskEval`` inputs go to ``...samples.json`` beside it, and
    the general suite's per-document scores (when lm-eval logged its samples) to ``...general.samples.json``.
    """
    data = build_stage_results(stage, after_task, in_domain, general, experts, config)
    path = Path(run_dir) / "eval" / stage_filename(stage, after_task)
    samples = {t: v.to_dict()["predictions"] for t, v in (in_domain or {}).items() if hasattr(v, "to_dict")}
    if write_samples and samples:
        atomic_write_json(path.with_suffix(".samples.json"), samples)
    general_samples = general_example_scores(general) if write_samples else {}
    if general_samples:
        atomic_write_json(general_samples_path(path), general_samples)
    return atomic_write_json(path, data)


def experts_from_stats(stats_file: str | os.PathLike) -> dict | None:
    """The stage results' view of a task's expert statistics (``stats/NN-TASK.json``), ``None`` without one."""
    from mora_dist.distributed.stats import expert_summary

    path = Path(stats_file)
    return expert_summary(read_json(path)) if path.is_file() else None


def read_stage_results(run_dir: str | os.PathLike) -> list[dict]:
    """All ``<run_dir>/eval/stage_XX_*.json`` results (samples files excluded), ordered by stage index.

    Raises ``FileNotFoundError`` when there are none and ``ValueError`` when two files claim one stage.
    """
    folder = Path(run_dir) / "eval"
    files = sorted(p for p in folder.glob("stage_*.json") if not p.name.endswith(".samples.json"))
    if not files:
        raise FileNotFoundError(f"no stage results in {folder} (expected stage_XX_<name>.json files)")
    stages: dict[int, dict] = {}
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        info = data.get("mora_dist")
        if not isinstance(info, dict) or "stage" not in info:
            raise ValueError(f"{path}: no 'mora_dist.stage' section; write it with write_stage_results")
        if info["stage"] in stages:
            raise ValueError(f"{path}: stage {info['stage']} appears in two files")
        stages[info["stage"]] = data
    return [stages[k] for k in sorted(stages)]
