"""How much one invocation of a run may do: stage and task bounds, a wall-clock budget, SIGTERM/SIGINT.

A scheduled job (cron, a Slurm chain) does a bounded piece of the stream and exits 0; a signal makes training
checkpoint at the next step and the process exit with ``EXIT_INTERRUPTED`` (75). Either way the run resumes
where it stopped. Every worker takes the same decision (one vote per step), so none waits for the others.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Callable

from mora_dist.distributed.collectives import any_rank

EXIT_INTERRUPTED = 75


class StopRun(Exception):
    """Raised to end this invocation early (limits or a signal); the run is resumable."""

    def __init__(self, reason: str, code: int = 0):
        super().__init__(reason)
        self.code = code


@dataclass
class Limits:
    """Bounds on the work of one invocation.

    Attributes:
        max_stages: run at most this many stages, then exit 0.
        until_task: stop once this task's last stage is done.
        time_budget: seconds; no stage starts, and training checkpoints and stops, when the budget is near.
    """

    max_stages: int | None = None
    until_task: str | None = None
    time_budget: float | None = None


class Guard:
    """Watches the limits, the signals and the clock of one invocation.

    Args:
        limits: the bounds.
        log: prints a line (rank 0).
    """

    def __init__(self, limits: Limits, log: Callable[[str], None]):
        self.limits = limits
        self.log = log
        self.t0 = time.monotonic()
        self.stages_run = 0
        self.stop_signal: int | None = None
        self.step_seconds = 0.0  # the slowest training step yet: how long the next one may take

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def install_signals(self) -> dict:
        """Catch SIGTERM and SIGINT (training checkpoints and stops); returns the previous handlers."""
        def handler(signum, frame):
            self.stop_signal = signum
            self.log(f"received signal {signum}: will checkpoint and exit")

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def restore_signals(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def before_stage(self, stage: str) -> None:
        """Raise ``StopRun`` if ``stage`` may not start."""
        lim = self.limits
        if self.stop_signal is not None:
            raise StopRun(f"stopped by signal {self.stop_signal} before {stage}", EXIT_INTERRUPTED)
        if lim.max_stages is not None and self.stages_run >= lim.max_stages:
            raise StopRun(f"did {self.stages_run} stage(s) (max_stages); next: {stage}")
        if lim.time_budget is not None and self.elapsed() > lim.time_budget * 0.9:
            raise StopRun(f"time budget nearly spent ({self.elapsed():.0f}s of {lim.time_budget:.0f}s); next: {stage}")

    def training_stop(self) -> str | None:
        """Why training must checkpoint and stop after this step, or ``None``; the same on every worker."""
        reason = None
        if self.stop_signal is not None:
            reason = f"stopped by signal {self.stop_signal}"
        budget = self.limits.time_budget
        if budget is not None and self.elapsed() + 3 * self.step_seconds + 30 > budget:
            reason = f"time budget nearly spent ({self.elapsed():.0f}s of {budget:.0f}s)"
        if any_rank(reason is not None) and reason is None:
            reason = "another worker is stopping"
        return reason

    def stop_training(self, reason: str) -> StopRun:
        """The ``StopRun`` that ends training for ``reason`` (exit code 75 after a signal)."""
        return StopRun(reason, EXIT_INTERRUPTED if self.stop_signal is not None else 0)
