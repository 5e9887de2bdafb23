"""The run directory: its layout, the record of completed stages, and the exclusive lock.

Layout of a run directory::

    config.yaml          the resolved run config (a rerun must match it)
    ds_config.json       the DeepSpeed config derived from it (distributed runs)
    version.json         package, torch and transformers versions
    state.json           completed stages, in order, with timings (written atomically after each stage)
    progress.json        the current task and step, the last loss (for ``mora-dist status``)
    lock                 the exclusive lock (flock) and its holder
    ckpt/NN-TASK/        the newest mid-task checkpoint of the task being trained
    stats/NN-TASK.json   all-reduced expert statistics and the pruning decision of each task
    adapters/NN-TASK/    the adapter after each task (all blocks frozen): adapter.safetensors + adapter.json
    eval/stage_XX_*.json lm-eval-style results per checkpoint (XX = 00 for the base model)
    report/              report.json, report.md and the PNG plots

Stages, in order: ``base/evaluate``, then for each task ``NN-TASK/{grow, train, stats, prune, save, evaluate,
report}``.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from mora_dist.io import atomic_write_json, atomic_write_text, read_json

TASK_STAGES = ("grow", "train", "stats", "prune", "save", "evaluate", "report")
BASE_STAGE = "base/evaluate"


def task_key(index: int, name: str) -> str:
    """``NN-NAME``: the task's folder and stage prefix."""
    return f"{index:02d}-{name}"


def all_stages(tasks: list[str]) -> list[str]:
    """Every stage of a stream, in execution order."""
    out = [BASE_STAGE]
    for i, name in enumerate(tasks):
        out += [f"{task_key(i, name)}/{s}" for s in TASK_STAGES]
    return out


@dataclass(frozen=True)
class StageKey:
    """A parsed stage name: ``index`` and ``task`` are ``None`` for the base model's evaluation."""

    index: int | None
    task: str | None
    step: str


def parse_stage(stage: str) -> StageKey:
    """``"01-FOMC/train"`` → ``StageKey(1, "FOMC", "train")``; ``"base/evaluate"`` → ``StageKey(None, None,
    "evaluate")``. The one parser of stage names (the orchestrator and ``compare`` read them)."""
    key, step = stage.split("/")
    if stage == BASE_STAGE:
        return StageKey(None, None, step)
    index, name = key.split("-", 1)
    return StageKey(int(index), name, step)


def last_stage_of(tasks: list[str], name: str) -> str:
    """The stage that ends task ``name`` (``--until-task``).

    Raises:
        RunStateError: ``name`` is not a task of the stream.
    """
    if name not in tasks:
        raise RunStateError(f"--until-task {name!r} is not a task of this stream ({', '.join(tasks)})")
    return f"{task_key(tasks.index(name), name)}/{TASK_STAGES[-1]}"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunStateError(RuntimeError):
    """The run directory cannot be used as asked (another holder, another stream)."""


@dataclass
class RunDir:
    """Paths inside a run directory."""

    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    def ckpt(self, index: int, name: str) -> Path:
        return self.root / "ckpt" / task_key(index, name)

    def adapter(self, index: int, name: str) -> Path:
        return self.root / "adapters" / task_key(index, name)

    def stats(self, index: int, name: str) -> Path:
        return self.root / "stats" / f"{task_key(index, name)}.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def progress_file(self) -> Path:
        return self.root / "progress.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"


class RunState:
    """The completed stages of a run, persisted atomically after every change."""

    def __init__(self, run_dir: RunDir, tasks: list[str], persist: bool = True):
        self.dir = run_dir
        self.persist = persist  # only rank 0 writes; every rank keeps the same record in memory
        self.tasks = list(tasks)
        self.stages = all_stages(self.tasks)
        self.done: dict[str, dict] = {}
        path = run_dir.state_file
        if path.is_file():
            data = read_json(path)
            if data.get("tasks") != self.tasks:
                raise RunStateError(
                    f"{path}: this run directory holds the stream {data.get('tasks')}, not {self.tasks}; "
                    "use another run_dir for a different stream")
            self.done = {d["stage"]: d for d in data.get("done", [])}

    def is_done(self, stage: str) -> bool:
        return stage in self.done

    def pending(self) -> list[str]:
        return [s for s in self.stages if s not in self.done]

    @property
    def finished(self) -> bool:
        return not self.pending()

    def mark(self, stage: str, seconds: float, **info) -> None:
        """Record ``stage`` as completed (atomic)."""
        self.done[stage] = {"stage": stage, "finished_at": now(), "seconds": round(seconds, 3), **info}
        self.save()

    def save(self) -> None:
        if not self.persist:
            return
        ordered = [self.done[s] for s in self.stages if s in self.done]
        atomic_write_json(self.dir.state_file, {"version": 1, "tasks": self.tasks, "done": ordered})


class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``<run_dir>/lock``).

    The kernel drops the lock when its holder dies, even by ``kill -9``, so a lock left by a dead process is
    detected as stale and taken over, with a message naming the previous holder.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / "lock"
        self.fh = None
        self.previous: dict | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "{}"
            fh.close()
            try:
                info = json.loads(holder)
            except json.JSONDecodeError:
                info = {}
            raise RunStateError(
                f"{self.path.parent} is in use by another job: pid {info.get('pid', '?')} on host "
                f"{info.get('host', '?')} since {info.get('since', '?')} ({info.get('command', '?')}); wait for it "
                "to finish or stop it, then rerun") from None
        fh.seek(0)
        old = fh.read().strip()
        if old:
            try:
                self.previous = json.loads(old)
            except json.JSONDecodeError:
                self.previous = {"raw": old}
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now(),
                             "command": " ".join(sys.argv)}))
        fh.flush()
        self.fh = fh
        return self

    def release(self) -> None:
        if self.fh is not None:
            self.fh.seek(0)
            self.fh.truncate()
            self.fh.flush()
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def prepare_run_dir(run_dir: RunDir, cfg, world_size: int) -> None:
    """Create the run directory, write the resolved config (or check that a rerun's config is the stored one)
    and the versions of the packages.

    Raises:
        ConfigError: the directory was started with another config (the differing keys are named).
    """
    import torch
    import transformers

    from mora_dist import __version__
    from mora_dist.config import ConfigError, dump_config, load_config

    root = run_dir.root
    root.mkdir(parents=True, exist_ok=True)
    cfg_file = root / "config.yaml"
    if cfg_file.is_file():
        differ = config_differences(load_config(cfg_file).to_dict(), cfg.to_dict())
        if differ:
            raise ConfigError(
                f"{cfg_file}: this run directory was started with another config ({keys_text(differ)} differ); "
                "rerun with the same config and overrides, "
                "or use another run_dir")
    else:
        atomic_write_text(cfg_file, dump_config(cfg))
    atomic_write_json(root / "version.json", {"mora_dist": __version__, "torch": torch.__version__,
                                              "transformers": transformers.__version__, "world_size": world_size})


def keys_text(keys: list[str], shown: int = 6) -> str:
    """The first ``shown`` dotted keys, comma-separated, with `` ...`` when there are more."""
    return ", ".join(keys[:shown]) + (" ..." if len(keys) > shown else "")


def config_differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts/lists."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += config_differences(x, y, f"{prefix}.{i}")
        return out
    return [] if a == b else [prefix or "<root>"]
