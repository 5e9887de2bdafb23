"""``mora-dist compare CONFIG --methods mora,seq_lora,olora,moe_lora [--seeds 0,1,2] [overrides]``: methods compared.

Each method runs the config's stream, data order and seeds in its own sibling run directory
``<run_dir>-<method>`` (with ``--seeds``: ``<run_dir>-<method>-seed<S>``, one per training seed ``train.seed=S``)
through the ordinary orchestrator, so each is resumable exactly like ``mora-dist run``: rerun the same command
after a crash and finished runs are skipped. The base model is evaluated once: the later runs copy the first run's
``base/evaluate`` results (``run/shared_base.py``); a method run alone (one job per method) copies them from any
sibling run directory that has them. Then one comparison is written to ``<run_dir>-compare/``:

* ``compare.json``: per method (``runs``; with ``--seeds``: ``seed_runs`` per seed and ``aggregate``, the mean,
  standard deviation, minimum and maximum over seeds of every metric and of every difference from the reference)
  the continual-learning metrics of its ``report/report.json`` (AP, BWT in both conventions, FWT, forgetting,
  learning accuracy LA and its per-task values), the mean general-capability change from the base model after the
  last task, the final row of scores, parameter counts, training and evaluation time from ``state.json``, seeds
  and sample counts; ``intervals``: the paired bootstrap over test examples (``evaluation.bootstrap``) of every
  metric per method (of its mean over seeds) and of every difference ``method - reference`` (the reference is
  ``mora`` when compared, else the first method), each marked resolved when its interval excludes 0, and, when the
  runs stored their general-suite documents' scores, of the general-capability change (``general_change``);
* ``compare.md``: the same as tables;
* ``compare.png``: final score per task per method, AP / BWT per method, and each method's learning accuracy against
  its forgetting (plasticity against stability), with the bootstrap intervals.

Besides the four methods, the variants of ``mora_dist.methods.VARIANTS`` run (``mora_noprune``: ``mora`` with
``prune.enabled=false``).

Parameter counts come from the last adapter's ``adapter.json`` (per layer d_in, d_out, block sizes):
``trainable_params_per_task`` is what one task trains (a block of ``r_task`` experts, plus its router row for
moe_lora), ``adapter_params`` the whole final bank, ``active_params_per_token`` the adapter parameters read to
compute one token's output (ungated: the whole bank; mora: every key, since all are scored, plus the values of the
``min(k, R)`` kept experts; moe_lora: every router row plus the keys and values of the ``top_k`` kept blocks,
the largest blocks counted). Times are the recorded durations of completed stages, training counted as the sum of
its optimizer steps' times, so that a training resumed after a stop counts whole; work lost to a crash (steps
trained again after it) is not counted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mora_dist.compare_render import fmt, render_figure, render_markdown
from mora_dist.config import ConfigError, RunConfig, load_config
from mora_dist.evaluation.bootstrap import BootstrapSettings, paired_intervals
from mora_dist.evaluation.forgetting import FORGETTING_CONVENTIONS, METRIC_NAMES
from mora_dist.io import atomic_write_json, atomic_write_text, read_json
from mora_dist.methods import VARIANTS
from mora_dist.mora.config import MoRAConfig
from mora_dist.run.state import parse_stage
METRICS = METRIC_NAMES  # AP, BWT, BWT_trace, FWT, forgetting, LA


def parse_methods(text: str) -> list[str]:
    """The comma-separated method list, checked (known names, no repeats)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in VARIANTS]
    if not names or unknown:
        raise ConfigError(f"--methods {text!r}: unknown {unknown or 'empty list'}; choose from "
                          f"{', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods {text!r}: a method is listed twice")
    return names


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,1,2`` as a list of distinct integers (``None`` when not given)."""
    if text is None:
        return None
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


# keys a method's own override may not set: the compared name decides the method, and every run's directory is
# ``<run_dir>-<method>`` so that resuming and ``--collect-only`` find it
_SHARED_ONLY = ("method", "run_dir")


def parse_method_overrides(values: Sequence[str] | None, methods: Sequence[str]) -> dict[str, list[str]]:
    """``--method-override METHOD:KEY=VALUE`` (repeatable) as ``{method: [KEY=VALUE, ...]}``, checked.

    A method's own settings on top of the shared config and overrides, e.g. each method at its own tuned learning
    rate (``mora:train.lr=2e-3``). The keys and values are checked when the method's config is built.
    """
    out: dict[str, list[str]] = {}
    for text in values or []:
        name, sep, setting = text.partition(":")
        name, setting = name.strip(), setting.strip()
        key = setting.split("=", 1)[0].strip()
        if not sep or "=" not in setting or not name or not key:
            raise ConfigError(f"--method-override {text!r}: give METHOD:KEY=VALUE, e.g. "
                              "--method-override mora:train.lr=2e-3")
        if name not in methods:
            raise ConfigError(f"--method-override {text!r}: {name!r} is not among --methods "
                              f"({', '.join(methods)}); name one of them")
        if key in _SHARED_ONLY:
            raise ConfigError(f"--method-override {text!r}: {key} cannot differ per method (the method is the "
                              "--methods name; the run directories are <run_dir>-<method>); set run_dir as an "
                              "ordinary override for every method")
        out.setdefault(name, []).append(setting)
    return out


def method_config(config: str | os.PathLike, overrides: list[str], name: str, seed: int | None = None,
                  own: Sequence[str] = ()) -> RunConfig:
    """The run config of one method (and training seed): shared config and overrides, method, the method's own
    overrides ``own`` (``--method-override``), own run directory."""
    base = load_config(config, overrides)
    method, extra = VARIANTS[name]
    extra = list(extra) + list(own) + ([f"train.seed={seed}"] if seed is not None else [])
    cfg = load_config(config, list(overrides) + [f"method={method}"] + extra)
    cfg.run_dir = f"{base.run_dir}-{name}" + (f"-seed{seed}" if seed is not None else "")
    return cfg


def compare_dir(config: str | os.PathLike, overrides: list[str]) -> Path:
    return Path(f"{load_config(config, overrides).run_dir}-compare")


def run_compare(config: str | os.PathLike, methods: list[str], overrides: list[str], limits=None,
                seeds: list[int] | None = None, bootstrap: BootstrapSettings = BootstrapSettings(),
                collect_only: bool = False, method_overrides: Mapping[str, Sequence[str]] | None = None) -> int:
    """Run (or resume) every method (for every seed) in turn, then write the comparison; returns the exit code.

    A run that stops early (a signal, a limit) ends the command with its code; the comparison is written once
    every run is complete. Without ``seeds`` each method runs once with the config's ``train.seed``. With
    ``collect_only`` nothing runs: the comparison is written from run directories finished elsewhere (one job per
    method, say), each checked by ``finished_run_dir``. ``method_overrides`` (``parse_method_overrides``) are each
    method's own settings; they are part of its run's config, so a changed one is refused like any changed setting.
    """
    from mora_dist.run.orchestrator import run
    from mora_dist.run.state import RunDir, RunState

    from mora_dist.run.shared_base import sibling_with_base

    run_dirs: dict[str, list[Path]] = {name: [] for name in methods}
    prefix = load_config(config, overrides).run_dir
    first: Path | None = None  # the base model's evaluation is computed once (run/shared_base.py)
    for seed in seeds or [None]:
        for name in methods:
            cfg = method_config(config, overrides, name, seed, (method_overrides or {}).get(name, ()))
            if collect_only:
                run_dirs[name].append(finished_run_dir(cfg, name))
                continue
            label = name if seed is None else f"{name}, seed {seed}"
            print(f"[mora-dist compare] method {label}: {cfg.run_dir}", flush=True)
            code = run(cfg, limits, base_from=first or sibling_with_base(prefix, cfg))
            first = first or Path(cfg.run_dir)
            if code != 0:
                return code
            state = RunState(RunDir(Path(cfg.run_dir)), [t.name for t in cfg.tasks], persist=False)
            if not state.finished:
                print(f"[mora-dist compare] {cfg.run_dir} is not finished (limits); rerun to continue", flush=True)
                return 0
            run_dirs[name].append(Path(cfg.run_dir))
    out = compare_dir(config, overrides)
    try:
        comparison = write_comparison(run_dirs, out, seeds=seeds, bootstrap=bootstrap,
                                      method_overrides=method_overrides)
    except ValueError as err:  # runs that cannot be compared (another stream, other test examples)
        raise ConfigError(f"cannot compare the runs: {err}") from err
    summary = comparison["aggregate"] if seeds else comparison["runs"]
    print(f"[mora-dist compare] comparison written to {out}: " + ", ".join(
        f"{m} AP={fmt(r['AP']['mean'] if seeds else r['metrics']['AP'])}" for m, r in summary.items()), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- collecting
COLLECT_IGNORED_KEYS = ("run_dir", "data.root")  # where a run lived and read its data, not what it computed


def finished_run_dir(cfg: RunConfig, method: str) -> Path:
    """``cfg.run_dir``, checked to hold a finished run of ``cfg`` (for ``--collect-only``).

    The stored config must equal ``cfg`` but for ``COLLECT_IGNORED_KEYS`` (a run finished on another machine keeps
    its own paths; the comparison still checks that every run scored the same test examples).

    Raises:
        ConfigError: no run there, a run of another config (the differing keys are named), or one not finished.
    """
    from mora_dist.run.state import RunDir, RunState, config_differences, keys_text

    root = Path(cfg.run_dir)
    stored = root / "config.yaml"
    if not stored.is_file():
        raise ConfigError(f"{root}: no run of method {method} here (no config.yaml); run it first "
                          f"(mora-dist compare CONFIG --methods {method} with the same overrides), or drop "
                          "--collect-only")
    differ = [k for k in config_differences(load_config(stored).to_dict(), cfg.to_dict())
              if k not in COLLECT_IGNORED_KEYS]
    if differ:
        raise ConfigError(f"{stored}: this run of method {method} used another config ({keys_text(differ)} "
                          "differ); compare runs of the same config and overrides")
    state = RunState(RunDir(root), [t.name for t in cfg.tasks], persist=False)
    if not state.finished:
        pending = state.pending()
        raise ConfigError(f"{root}: the run of method {method} is not finished ({len(pending)} stages to go, next "
                          f"{pending[0]}); finish it (rerun its command), or drop --collect-only")
    return root


def parameter_counts(adapter_json: dict) -> dict:
    """Trainable parameters per task, parameters of the final bank, and active parameters per token."""
    mora = MoRAConfig.upgrade_legacy(adapter_json["mora"])  # also adapters saved with gated + gate
    router = mora.get("gate", "self") == "router"
    gated = mora.get("gate", "self") != "none"
    per_task = total = active = 0
    for layer in adapter_json["layers"].values():
        d_in, d_out, sizes = layer["in_features"], layer["out_features"], layer["block_sizes"]
        R = sum(sizes)
        per_task += mora["r_task"] * (d_in + d_out) + (d_in if router else 0)
        total += R * (d_in + d_out) + (len(sizes) * d_in if router else 0)
        if not gated:
            active += R * (d_in + d_out)
        elif router:
            kept = sorted(sizes, reverse=True)[:mora.get("router_top_k", 2)]
            active += len(sizes) * d_in + sum(kept) * (d_in + d_out)
        else:
            active += R * d_in + min(mora["k"], R) * d_out
    return {"trainable_params_per_task": per_task, "adapter_params": total, "active_params_per_token": active}


def _stage_seconds(state: dict, suffix: str) -> float:
    return round(sum(d.get("seconds", 0.0) for d in state["done"] if d["stage"].endswith(suffix)), 3)


def _times(run_dir: Path, state: dict) -> dict:
    """Seconds per kind of stage. ``train`` is the sum of the optimizer steps' recorded times (``metrics.jsonl``
    holds exactly one line per step that counts, so a training resumed after a stop is counted whole; the stage's
    own duration is only that of its last attempt), falling back to the stage durations without step records;
    ``total`` is every completed stage's duration with ``train`` in place of the train stages'."""
    from mora_dist.run.curves import read_metrics

    steps = [r.get("seconds") for r in read_metrics(run_dir) if isinstance(r.get("seconds"), (int, float))]
    stages = _stage_seconds(state, "/train")
    train = round(sum(steps), 3) if steps else stages
    return {"train": train, "evaluate": _stage_seconds(state, "/evaluate"), "stats": _stage_seconds(state, "/stats"),
            "total": round(_stage_seconds(state, "") - stages + train, 3)}


def collect_run(run_dir: Path) -> dict:
    """What the comparison needs from one finished run directory."""
    report = read_json(run_dir / "report" / "report.json")
    state = read_json(run_dir / "state.json")
    cfg = load_config(run_dir / "config.yaml")
    tasks = report["tasks"]
    last_adapter = [p for p in sorted((run_dir / "adapters").glob("[0-9]*")) if (p / "adapter.json").is_file()][-1]
    general = report.get("general") or {}
    change = (general.get("change_from_base") or [[]])[-1]
    change = [v for v in change if v is not None]
    train = {parse_stage(d["stage"]).task: d.get("info", {}) for d in state["done"]
             if parse_stage(d["stage"]).step == "train"}
    from mora_dist.evaluation.results import read_stage_results

    final_stage = read_stage_results(run_dir)[-1]["mora_dist"]["in_domain"]
    return {
        "run_dir": str(run_dir),
        "method": cfg.method,
        "prune_enabled": cfg.prune.enabled,
        "tasks": tasks,
        "metrics": {k: report["metrics"].get(k) for k in METRICS},
        "LA_per_task": report["metrics"].get("LA_per_task") or {},
        "answers": report.get("answers") or {"available": False, "tasks": {}},
        "final_scores": dict(zip(tasks, report["matrix"][-1])),
        "metric_names": report.get("metric_names", {}),
        "general_change": sum(change) / len(change) if change else None,
        "general_final_change": dict(zip(general.get("names", []), (general.get("change_from_base") or [[]])[-1])),
        "params": parameter_counts(read_json(last_adapter / "adapter.json")),
        "time_s": _times(run_dir, state),
        "seeds": {"train": cfg.train.seed, "eval": cfg.eval.seed},
        "samples": {"train_examples": {t: (train.get(t, {}).get("data") or {}).get("examples") for t in tasks},
                    "train_tokens": {t: (train.get(t, {}).get("data") or {}).get("tokens") for t in tasks},
                    "train_steps": {t: train.get(t, {}).get("steps") for t in tasks},
                    "eval_examples": {t: (final_stage.get(t) or {}).get("n") for t in tasks},
                    "general_limit": cfg.eval.general_limit if cfg.eval.general else None},
        "settings": {"r_task": cfg.mora.r_task, "k": cfg.mora.k, "gate": cfg.mora.gate,
                     "router_top_k": cfg.mora.router_top_k if cfg.method == "moe_lora" else None,
                     "olora": vars(cfg.olora) if cfg.method == "olora" else None,
                     "lr": cfg.train.lr, "max_steps": cfg.train.max_steps, "epochs": cfg.train.epochs},
    }


def spread(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation (n - 1), minimum and maximum of the defined values, and their count."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def _changed_share(run: dict) -> float | None:
    """The mean share of the earlier tasks' answers that the later tasks changed (``answers.answer_changes``)."""
    return ((run.get("answers") or {}).get("changes") or {}).get("mean_share")


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def build_comparison(run_dirs: Mapping[str, Path | Sequence[Path]], seeds: Sequence[int] | None = None,
                     bootstrap: BootstrapSettings = BootstrapSettings(),
                     method_overrides: Mapping[str, Sequence[str]] | None = None) -> dict:
    """The ``compare.json`` content for finished runs of one stream.

    Args:
        run_dirs: ``{method: run_dir}``, or ``{method: [run_dir per seed]}`` in the order of ``seeds``.
        seeds: the training seeds (``None``: one run per method with the config's seed).
        bootstrap: settings of the paired bootstrap.
        method_overrides: each method's own settings (``--method-override``), recorded as given.
    """
    groups = {m: [Path(d)] if isinstance(d, (str, os.PathLike)) else [Path(x) for x in d]
              for m, d in run_dirs.items()}
    n_seeds = len(seeds) if seeds is not None else 1
    if any(len(d) != n_seeds for d in groups.values()):
        raise ValueError(f"expected {n_seeds} run(s) per method, got {({m: len(d) for m, d in groups.items()})}")
    runs = {m: [collect_run(d) for d in dirs] for m, dirs in groups.items()}
    streams = {tuple(r["tasks"]) for rs in runs.values() for r in rs}
    if len(streams) != 1:
        raise ValueError(f"the runs do not share one stream: {sorted(streams)}")
    for i in range(n_seeds):
        used = {(rs[i]["seeds"]["train"], rs[i]["seeds"]["eval"]) for rs in runs.values()}
        if len(used) != 1:
            raise ValueError(f"the runs do not share their seeds: {sorted(used)}")
    tasks = list(next(iter(streams)))
    reference = "mora" if "mora" in groups else next(iter(groups))
    intervals = paired_intervals(groups, tasks, reference, bootstrap)
    diffs = {m: {k: [_diff(r["metrics"][k], ref["metrics"][k]) for r, ref in zip(rs, runs[reference])]
                 for k in METRICS} for m, rs in runs.items() if m != reference}
    for m, d in diffs.items():
        d["general_change"] = [_diff(r["general_change"], ref["general_change"])
                               for r, ref in zip(runs[m], runs[reference])]
        d["answers_changed"] = [_diff(_changed_share(r), _changed_share(ref))
                                for r, ref in zip(runs[m], runs[reference])]
    for m, per_metric in (intervals.get("differences") or {}).items():
        for k, entry in per_metric.items():
            entry["value"] = spread(diffs[m][k])["mean"]
    comp = {"tasks": tasks, "methods": list(groups), "reference": reference, "intervals": intervals,
            "conventions": dict(FORGETTING_CONVENTIONS),
            "method_overrides": {m: list(v) for m, v in (method_overrides or {}).items() if v}}
    if seeds is None:
        comp["runs"] = {m: rs[0] for m, rs in runs.items()}
    else:
        comp["seeds"] = list(seeds)
        comp["seed_runs"] = {m: {str(s): r for s, r in zip(seeds, rs)} for m, rs in runs.items()}
        comp["aggregate"] = {m: {k: spread([r["metrics"][k] for r in rs]) for k in METRICS}
                             for m, rs in runs.items()}
        for m, rs in runs.items():
            comp["aggregate"][m]["general_change"] = spread([r["general_change"] for r in rs])
            comp["aggregate"][m]["LA_per_task"] = {t: spread([r["LA_per_task"].get(t) for r in rs]) for t in tasks}
        comp["aggregate_differences"] = {m: {k: spread(v) for k, v in d.items()} for m, d in diffs.items()}
    return comp


def write_comparison(run_dirs: Mapping[str, Path | Sequence[Path]], out_dir: str | os.PathLike,
                     seeds: Sequence[int] | None = None, bootstrap: BootstrapSettings = BootstrapSettings(),
                     method_overrides: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Write ``compare.json``, ``compare.md`` and ``compare.png`` into ``out_dir``; returns the JSON content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comp = build_comparison(run_dirs, seeds, bootstrap, method_overrides)
    render_figure(comp, out / "compare.png")
    comp["figures"] = ["compare.png"]
    atomic_write_json(out / "compare.json", comp)
    atomic_write_text(out / "compare.md", render_markdown(comp))
    return comp
