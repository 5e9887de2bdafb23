"""``mora-dist compare CONFIG --methods mora,seq_lora,olora,moe_lora [overrides]``: methods side by side.

Each method runs the config's stream, data order and seeds in its own sibling run directory
``<run_dir>-<method>`` through the ordinary orchestrator (so each is resumable exactly like ``mora-dist run``:
rerun the same command after a crash and finished methods are skipped); then one comparison is written to
``<run_dir>-compare/``:

* ``compare.json``: per method the continual-learning metrics of its ``report/report.json`` (AP, BWT in both
  conventions, FWT, forgetting), the mean general-capability change from the base model after the last task,
  the final row of scores, parameter counts, training and evaluation time from ``state.json``, seeds and
  sample counts;
* ``compare.md``: the same as tables;
* ``compare.png``: final score per task per method, and AP / BWT per method.

Besides the four methods, ``mora_noprune`` runs ``mora`` with ``prune.enabled=false``.

Parameter counts come from the last adapter's ``adapter.json`` (per layer d_in, d_out, block sizes):
``trainable_params_per_task`` is what one task trains (a block of ``r_task`` experts, plus its router row for
moe_lora), ``adapter_params`` the whole final bank, ``active_params_per_token`` the adapter parameters read to
compute one token's output (ungated: the whole bank; mora: every key, since all are scored, plus the values of the
``min(k, R)`` kept experts; moe_lora: every router row plus the keys and values of the ``top_k`` kept blocks,
the largest blocks counted). Times are the recorded durations of completed stages; work lost to a crash before a
stage completed is not counted.
"""

from __future__ import annotations

import os
from pathlib import Path

from mora_dist.config import METHODS, ConfigError, RunConfig, load_config
from mora_dist.evaluation.forgetting import FORGETTING_CONVENTIONS
from mora_dist.io import atomic_write_json, atomic_write_text, read_json

VARIANTS = {m: (m, []) for m in METHODS}
VARIANTS["mora_noprune"] = ("mora", ["prune.enabled=false"])
METRICS = ("AP", "BWT", "BWT_trace", "FWT", "forgetting")


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


def method_config(config: str | os.PathLike, overrides: list[str], name: str) -> RunConfig:
    """The run config of one method: the shared config and overrides, the method, its own run directory."""
    base = load_config(config, overrides)
    method, extra = VARIANTS[name]
    cfg = load_config(config, list(overrides) + [f"method={method}"] + extra)
    cfg.run_dir = f"{base.run_dir}-{name}"
    return cfg


def compare_dir(config: str | os.PathLike, overrides: list[str]) -> Path:
    return Path(f"{load_config(config, overrides).run_dir}-compare")


def run_compare(config: str | os.PathLike, methods: list[str], overrides: list[str], limits=None) -> int:
    """Run (or resume) every method in turn, then write the comparison; returns the exit code.

    A method that stops early (a signal, a limit) ends the command with its code; the comparison is written
    once every method's run is complete.
    """
    from mora_dist.run.orchestrator import run
    from mora_dist.run.state import RunDir, RunState

    run_dirs = {}
    for name in methods:
        cfg = method_config(config, overrides, name)
        print(f"[mora-dist compare] method {name}: {cfg.run_dir}", flush=True)
        code = run(cfg, limits)
        if code != 0:
            return code
        state = RunState(RunDir(Path(cfg.run_dir)), [t.name for t in cfg.tasks], persist=False)
        if not state.finished:
            print(f"[mora-dist compare] {cfg.run_dir} is not finished (limits); rerun to continue", flush=True)
            return 0
        run_dirs[name] = Path(cfg.run_dir)
    out = compare_dir(config, overrides)
    comparison = write_comparison(run_dirs, out)
    print(f"[mora-dist compare] comparison written to {out}: " + ", ".join(
        f"{m} AP={_fmt(r['metrics']['AP'])}" for m, r in comparison["runs"].items()), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- collecting
def parameter_counts(adapter_json: dict) -> dict:
    """Trainable parameters per task, parameters of the final bank, and active parameters per token."""
    mora = adapter_json["mora"]
    router = mora.get("gate", "self") == "router"
    gated = mora.get("gated", True)
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
    train = {d["stage"].split("/")[0].split("-", 1)[1]: d.get("info", {}) for d in state["done"]
             if d["stage"].endswith("/train")}
    from mora_dist.evaluation.results import read_stage_results

    final_stage = read_stage_results(run_dir)[-1]["mora_dist"]["in_domain"]
    return {
        "run_dir": str(run_dir),
        "method": cfg.method,
        "prune_enabled": cfg.prune.enabled,
        "tasks": tasks,
        "metrics": {k: report["metrics"].get(k) for k in METRICS},
        "final_scores": dict(zip(tasks, report["matrix"][-1])),
        "metric_names": report.get("metric_names", {}),
        "general_change": sum(change) / len(change) if change else None,
        "general_final_change": dict(zip(general.get("names", []), (general.get("change_from_base") or [[]])[-1])),
        "params": parameter_counts(read_json(last_adapter / "adapter.json")),
        "time_s": {"train": _stage_seconds(state, "/train"), "evaluate": _stage_seconds(state, "/evaluate"),
                   "stats": _stage_seconds(state, "/stats"), "total": _stage_seconds(state, "")},
        "seeds": {"train": cfg.train.seed, "eval": cfg.eval.seed},
        "samples": {"train_examples": {t: (train.get(t, {}).get("data") or {}).get("examples") for t in tasks},
                    "train_tokens": {t: (train.get(t, {}).get("data") or {}).get("tokens") for t in tasks},
                    "train_steps": {t: train.get(t, {}).get("steps") for t in tasks},
                    "eval_examples": {t: (final_stage.get(t) or {}).get("n") for t in tasks},
                    "general_limit": cfg.eval.general_limit if cfg.eval.general else None},
        "settings": {"r_task": cfg.mora.r_task, "k": cfg.mora.k, "gated": cfg.mora.gated, "gate": cfg.mora.gate,
                     "router_top_k": cfg.mora.router_top_k if cfg.method == "moe_lora" else None,
                     "olora": vars(cfg.olora) if cfg.method == "olora" else None,
                     "lr": cfg.train.lr, "max_steps": cfg.train.max_steps, "epochs": cfg.train.epochs},
    }


def build_comparison(run_dirs: dict[str, Path]) -> dict:
    """The ``compare.json`` content for finished runs ``{method: run_dir}`` of one stream."""
    runs = {name: collect_run(Path(d)) for name, d in run_dirs.items()}
    streams = {tuple(r["tasks"]) for r in runs.values()}
    if len(streams) != 1:
        raise ValueError(f"the runs do not share one stream: {sorted(streams)}")
    seeds = {(r["seeds"]["train"], r["seeds"]["eval"]) for r in runs.values()}
    if len(seeds) != 1:
        raise ValueError(f"the runs do not share their seeds: {sorted(seeds)}")
    return {"tasks": list(next(iter(streams))), "methods": list(runs), "runs": runs,
            "conventions": dict(FORGETTING_CONVENTIONS)}


# ----------------------------------------------------------------------------------------------- writing
def _fmt(v, signed: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    v = v + 0.0  # no "-0.0000"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def render_markdown(comp: dict) -> str:
    runs, tasks = comp["runs"], comp["tasks"]
    out = ["# Method comparison", "", f"Stream: {' → '.join(tasks)}. Same data order and seeds for every method "
           f"(train seed {next(iter(runs.values()))['seeds']['train']}, eval seed "
           f"{next(iter(runs.values()))['seeds']['eval']}).", "", "## Continual-learning metrics", ""]
    out += _table(["method"] + list(METRICS) + ["general Δ"],
                  [[m] + [_fmt(r["metrics"][k], signed=k in ("BWT", "FWT")) for k in METRICS]
                   + [_fmt(r["general_change"], signed=True)] for m, r in runs.items()])
    out += ["", "General Δ: mean change of the general-suite scores from the base model after the last task.", "",
            "## Cost", ""]
    out += _table(["method", "trainable params / task", "adapter params", "active params / token", "train s",
                   "total s", "pruning"],
                  [[m, _fmt(r["params"]["trainable_params_per_task"]), _fmt(r["params"]["adapter_params"]),
                    _fmt(r["params"]["active_params_per_token"]), f"{r['time_s']['train']:.1f}",
                    f"{r['time_s']['total']:.1f}", "on" if r["prune_enabled"] else "off"] for m, r in runs.items()])
    out += ["", "## Settings", ""]
    out += _table(["method", "gate", "r_task", "experts kept / token", "O-LoRA λ_orth / λ_l2", "lr", "steps / epochs"],
                  [[m, ("router" if r["settings"]["gate"] == "router" else "self") if r["settings"]["gated"]
                    else "none (LoRA)", r["settings"]["r_task"],
                    (f"top-{r['settings']['router_top_k']} tasks" if r["settings"]["gate"] == "router" else
                     (f"k={r['settings']['k']}" if r["settings"]["gated"] else "all")),
                    (f"{r['settings']['olora']['lambda_orth']} / {r['settings']['olora']['lambda_l2']}"
                     if r["settings"]["olora"] else "–"), r["settings"]["lr"],
                    r["settings"]["max_steps"] if r["settings"]["max_steps"] else r["settings"]["epochs"]]
                   for m, r in runs.items()])
    out += ["", "## Final score per task", ""]
    out += _table(["method"] + tasks, [[m] + [_fmt(r["final_scores"][t]) for t in tasks] for m, r in runs.items()])
    out += ["", "## Samples", ""]
    out += _table(["method", "train examples", "train steps", "train tokens", "eval examples"],
                  [[m] + [" / ".join(str(r["samples"][key][t]) for t in tasks)
                          for key in ("train_examples", "train_steps", "train_tokens", "eval_examples")]
                   for m, r in runs.items()])
    out += ["", "Per task, in stream order.", "", "## Conventions", ""]
    out += [f"* **{k}**: {v}" for k, v in comp["conventions"].items()]
    out += ["", "![comparison](compare.png)"]
    return "\n".join(out) + "\n"


def render_figure(comp: dict, path: Path) -> Path:
    """Final score per task per method (grouped bars) and AP / BWT per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, tasks = comp["runs"], comp["tasks"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(9.0, 1.2 * len(tasks) * len(runs) / 2 + 6), 4.5))
    width = 0.8 / len(runs)
    for i, (m, r) in enumerate(runs.items()):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(tasks))]
        ax1.bar(xs, [r["final_scores"][t] or 0.0 for t in tasks], width, label=m)
    ax1.set_xticks(range(len(tasks)), labels=tasks, rotation=30, ha="right")
    ax1.set_ylabel("score after the last task"), ax1.set_title("Final score per task")
    ax1.legend(fontsize=8)
    names = list(runs)
    for i, (key, label) in enumerate((("AP", "AP"), ("BWT", "BWT (Lopez-Paz)"))):
        xs = [j + (i - 0.5) * 0.4 for j in range(len(names))]
        ax2.bar(xs, [runs[m]["metrics"][key] or 0.0 for m in names], 0.4, label=label)
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_xticks(range(len(names)), labels=names)
    ax2.set_title("AP and BWT per method"), ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_comparison(run_dirs: dict[str, Path], out_dir: str | os.PathLike) -> dict:
    """Write ``compare.json``, ``compare.md`` and ``compare.png`` into ``out_dir``; returns the JSON content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comp = build_comparison(run_dirs)
    render_figure(comp, out / "compare.png")
    comp["figures"] = ["compare.png"]
    atomic_write_json(out / "compare.json", comp)
    atomic_write_text(out / "compare.md", render_markdown(comp))
    return comp
