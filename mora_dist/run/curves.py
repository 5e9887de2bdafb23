"""Training curves: one line per optimizer step in ``RUN_DIR/metrics.jsonl`` (rank 0), TensorBoard scalars where
``tensorboard`` is installed, and the loss-curve figure of the report.

A line: ``{"task", "task_index", "step" (1-based, within the task), "steps", "loss", "lr", "grad_norm",
"tokens" (non-padding tokens of the global batch), "tokens_per_s", "seconds", "time"}``. ``grad_norm`` is the
gradient norm before clipping (null where the engine does not compute one: DeepSpeed without ZeRO).

**Exactly one line per step, whatever crashes.** A line is appended (and flushed) after its step, but the
checkpoint of that step may come later or never: a crash between the two leaves lines of steps the resumed run
will train again. So when a task's training starts or resumes from its checkpoint at step ``s``,
``begin_task`` first rewrites the file without the lines of that task with steps > ``s`` (and of any later
task, and any partial last line of a crash inside a write), atomically (temporary file + rename): a crash
during the rewrite leaves the old file, which the next start rewrites again.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from mora_dist.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The parsed lines of ``RUN_DIR/metrics.jsonl`` (a partial line left by a crash is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class TrainingCurves:
    """Rank 0's writer of the per-step metrics of a run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)
        self.path = self.root / METRICS_FILE
        self.task: tuple[int, str] | None = None
        self.tb = None

    def begin_task(self, index: int, name: str, start_step: int) -> None:
        """Before the first step of task ``index`` (resumed at ``start_step`` steps done): drop the lines that
        the coming steps will write again."""
        self.task = (index, name)
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            kept = []
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                i = rec.get("task_index")
                if isinstance(i, int) and (i < index or (i == index and rec.get("step", 0) <= start_step)):
                    kept.append(line)
            new = "".join(line + "\n" for line in kept)
            if new != text:
                atomic_write_text(self.path, new)
        self._open_tensorboard(index, name, start_step)

    def _open_tensorboard(self, index: int, name: str, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.tb = None
            return
        # one log folder per task; purge_step drops events a crashed attempt wrote beyond the checkpoint
        self.tb = SummaryWriter(str(self.root / "tensorboard" / f"{index:02d}-{name}"), purge_step=start_step + 1)

    def log_step(self, step: int, steps: int, loss: float, lr: float, grad_norm: float | None, tokens: int,
                 seconds: float) -> dict:
        """Append the line of optimizer step ``step`` (1-based) of the current task; returns it."""
        index, name = self.task
        rec = {"task": name, "task_index": index, "step": step, "steps": steps, "loss": _finite(loss), "lr": lr,
               "grad_norm": _finite(grad_norm), "tokens": tokens,
               "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None, "seconds": round(seconds, 4),
               "time": round(time.time(), 3)}
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if rec[key] is not None:
                    self.tb.add_scalar(f"train/{key}", rec[key], step)
            self.tb.flush()
        return rec

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def plot_loss_curves(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path | None:
    """``out_dir/loss_curves.png``: the training loss per step, one panel per task; ``None`` without metrics."""
    records = read_metrics(run_dir)
    tasks: dict[int, tuple[str, list[tuple[int, float]]]] = {}
    for rec in records:
        if rec.get("loss") is not None:
            tasks.setdefault(rec["task_index"], (rec["task"], []))[1].append((rec["step"], rec["loss"]))
    if not tasks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tasks)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (index, (name, points)) in zip(axes.flat, sorted(tasks.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_title(f"{index:02d} {name}", fontsize=9)
        ax.set_xlabel("step"), ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Training loss per optimizer step")
    fig.tight_layout()
    path = Path(out_dir) / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class TrainProgress:
    """Rank 0's view of one task's training: a tqdm bar and the training curves (nothing on other ranks).

    Args:
        run_dir: the run directory (``metrics.jsonl`` is appended there).
        enabled: rank 0.
        start: the step training starts or resumes from; the curves' lines of later steps are dropped first.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, index: int, name: str, steps: int, start: int):
        self.steps = steps
        self.bar = self.curves = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, initial=start, desc=f"train {name}", unit="step", dynamic_ncols=True,
                            mininterval=1.0)
            self.curves = TrainingCurves(run_dir)
            self.curves.begin_task(index, name, start)
        self.tokens_seen, self.t_start = 0, time.monotonic()

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, tokens: int, real_tokens: int,
             seconds: float) -> None:
        """After optimizer step ``step`` (0-based): ``tokens`` of the global batch (curves), ``real_tokens`` the
        non-padding tokens trained on every worker together (the bar's rate)."""
        self.tokens_seen += real_tokens
        if self.curves is not None:
            self.curves.log_step(step + 1, self.steps, loss, lr, grad_norm, tokens, seconds)
        if self.bar is not None:
            rate = self.tokens_seen / max(time.monotonic() - self.t_start, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.curves is not None:
            self.curves.close()
