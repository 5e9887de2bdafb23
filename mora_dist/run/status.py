"""``mora-dist status RUN_DIR``: what a run directory holds, read without loading any model."""

from __future__ import annotations

import json
from pathlib import Path

from mora_dist.config import load_config
from mora_dist.io import read_json
from mora_dist.run.state import RunDir, RunState


def status(run_dir: str | Path) -> dict:
    """Stages done and pending, the current task and step, and the last metrics."""
    d = RunDir(Path(run_dir))
    cfg_file = d.root / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{d.root}: not a run directory (no config.yaml)")
    cfg = load_config(cfg_file)
    state = RunState(d, [t.name for t in cfg.tasks])
    progress = read_json(d.progress_file) if d.progress_file.is_file() else None
    last_eval = next((s for s in reversed(state.stages) if s.endswith("evaluate") and state.is_done(s)), None)
    last_report = next((s for s in reversed(state.stages) if s.endswith("report") and state.is_done(s)), None)
    return {
        "run_dir": str(d.root),
        "tasks": state.tasks,
        "done": [s for s in state.stages if state.is_done(s)],
        "pending": state.pending(),
        "finished": state.finished,
        "progress": progress,
        "last_eval": {"stage": last_eval, **state.done[last_eval].get("info", {})} if last_eval else None,
        "metrics": state.done[last_report].get("info") if last_report else None,
    }


def print_status(run_dir: str | Path) -> int:
    try:
        st = status(run_dir)
    except FileNotFoundError as err:
        print(f"mora-dist: error: {err}")
        return 2
    n_done, n_all = len(st["done"]), len(st["done"]) + len(st["pending"])
    print(f"run {st['run_dir']}: {n_done}/{n_all} stages done" + (" (finished)" if st["finished"] else ""))
    print(f"stream: {' -> '.join(st['tasks'])}")
    if st["pending"]:
        print(f"next stage: {st['pending'][0]}")
    if st["progress"] and not st["finished"]:
        p = st["progress"]
        print(f"training {p['task']}: step {p['step']}/{p['steps']}, loss {p['loss']}")
    if st["last_eval"]:
        print(f"last evaluation ({st['last_eval'].pop('stage')}): {json.dumps(st['last_eval'])}")
    if st["metrics"]:
        print(f"forgetting metrics: {json.dumps(st['metrics'])}")
    return 0
