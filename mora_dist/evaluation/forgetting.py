"""Continual-learning summary metrics over a score matrix, for one matrix or a batch of them.

Matrix layout used everywhere in this package: ``R`` has ``T + 1`` rows and ``T`` columns for a stream of ``T``
tasks. Row 0 is the base model before any training; row ``i + 1`` is the model after training tasks ``0..i``;
column ``j`` is task ``j``. An entry is ``None`` (``NaN`` in the batched form) where that task was not evaluated at
that stage.

The literature writes ``D[i][j]`` for "after tasks 0..i" and ``D[-1][j]`` for the base model, so
``D[i][j] = R[i+1][j]`` and ``D[-1][j] = R[0][j]``. Terms whose entries are missing are left out of their mean (and
out of its divisor); a metric is ``None`` when no term is left or when it is undefined for the stream length (BWT,
BWT_trace, FWT and forgetting need ``T >= 2``).

There is one implementation, ``batch_metrics``, vectorised over a stack of matrices (the bootstrap evaluates
thousands of resampled matrices at once); the per-metric functions are that implementation on one matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float | None]]

FORGETTING_CONVENTIONS: dict[str, str] = {
    "AP": "Average performance (TRACE: OP) = mean_j R[T][j]: mean final score over all tasks; higher is better.",
    "BWT": "Backward transfer, Lopez-Paz & Ranzato (2017) = mean_{j<T-1} (R[T][j] - R[j+1][j]): final score minus "
           "score right after learning task j, over all but the last task. Negative means forgetting.",
    "BWT_trace": "Backward transfer as TRACE/MoRAM report it = -(1/T) sum_j min(R[T][j] - R[j+1][j], 0): only drops "
                 "count, as a positive magnitude, averaged over all T tasks (the last contributes 0). Lower is better.",
    "FWT": "Forward transfer = mean_{j>=1} (R[j][j] - R[0][j]): score on task j just before training on it (after "
           "tasks 0..j-1) minus the base model's score. Positive means earlier tasks helped.",
    "forgetting": "Forgetting (Chaudhry et al. 2018) = mean_{j<T-1} max_{j<=l<T-1} (R[l+1][j] - R[T][j]): best score "
                  "on task j from the stage where it was learned (row j+1) up to the one before the last, minus the "
                  "final score. The zero-shot rows before task j was learned do not count. Positive means forgetting.",
    "LA": "Learning accuracy (plasticity) = mean_j R[j+1][j]: score on task j right after training on it, over all "
          "T tasks (per-task values in LA_per_task). Low LA with little forgetting means the method learned little.",
}
# Row indices in the conventions above are rows of the (T+1)-row matrix: R[0] = base model, R[i+1] = after task i.
METRIC_NAMES = tuple(FORGETTING_CONVENTIONS)


def _as_batch(R) -> np.ndarray:
    """``(B, T+1, T)`` float array (NaN = not evaluated) from one matrix or a stack; shapes checked."""
    if isinstance(R, np.ndarray):
        arr = np.asarray(R, dtype=float)
        if arr.ndim == 2:
            arr = arr[None]
    else:
        if len(R) < 1:
            raise ValueError("score matrix needs T+1 >= 2 rows (base model + one per task), got 0")
        for i, row in enumerate(R):
            if len(row) != len(R) - 1:
                raise ValueError(f"score matrix row {i} has {len(row)} entries, expected T={len(R) - 1} "
                                 "(one per task)")
        arr = np.array([[np.nan if v is None else float(v) for v in row] for row in R], dtype=float)[None]
    if arr.ndim != 3 or arr.shape[1] < 2 or arr.shape[1] != arr.shape[2] + 1:
        raise ValueError(f"score matrix needs T+1 >= 2 rows (base model + one per task) and T columns, got shape "
                         f"{arr.shape[-2:] if arr.ndim >= 2 else arr.shape}")
    return arr


def _nanmean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over ``axis`` of the non-NaN entries; NaN where there are none (and no warning)."""
    ok = ~np.isnan(x)
    count = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def batch_metrics(R) -> dict[str, np.ndarray]:
    """Every metric of ``FORGETTING_CONVENTIONS`` for each matrix of a stack.

    Args:
        R: one ``(T+1) x T`` matrix (nested lists with ``None``, or an array with NaN) or a ``(B, T+1, T)`` array.

    Returns:
        ``{name: array of shape (B,)}`` for each name in ``METRIC_NAMES`` (NaN where undefined), plus
        ``LA_per_task`` of shape ``(B, T)`` (``R[j+1][j]``).
    """
    M = _as_batch(R)
    B, T = M.shape[0], M.shape[2]
    final = M[:, T, :]                                          # R[T][j]
    learned = np.diagonal(M[:, 1:, :], axis1=1, axis2=2)        # R[j+1][j], (B, T)
    nan = np.full(B, np.nan)
    out = {"AP": _nanmean(final), "LA": _nanmean(learned), "LA_per_task": learned.copy()}
    if T < 2:
        out.update(BWT=nan, BWT_trace=nan.copy(), FWT=nan.copy(), forgetting=nan.copy())
        return out
    drop = final - learned
    out["BWT"] = _nanmean(drop[:, :T - 1])
    clipped = np.minimum(drop, 0.0)  # NaN stays NaN, so it leaves the divisor too
    out["BWT_trace"] = 0.0 - _nanmean(clipped)  # 0.0 - x: a magnitude, never "-0.0"
    before = np.diagonal(M[:, :T, :], axis1=1, axis2=2)[:, 1:]  # R[j][j], j >= 1
    out["FWT"] = _nanmean(before - M[:, 0, 1:])
    # rows j+1 .. T-1 for task j < T-1: the lower triangle (row index >= column index) of M[:, 1:T, :T-1]
    gap = M[:, 1:T, :T - 1] - final[:, None, :T - 1]
    gap = np.where(np.tril(np.ones((T - 1, T - 1), dtype=bool))[None] & ~np.isnan(gap), gap, -np.inf)
    best = gap.max(axis=1)
    out["forgetting"] = _nanmean(np.where(np.isneginf(best), np.nan, best))
    return {k: out[k] for k in (*METRIC_NAMES, "LA_per_task")}


def _scalar(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _one(R: Matrix, name: str) -> float | None:
    return _scalar(batch_metrics(R)[name][0])


def average_performance(R: Matrix) -> float | None:
    """AP = mean over tasks of the final row (TRACE's OP). See ``FORGETTING_CONVENTIONS['AP']``."""
    return _one(R, "AP")


def backward_transfer(R: Matrix) -> float | None:
    """Lopez-Paz BWT = mean_{j<T-1} (R[T][j] - R[j+1][j]); negative means forgetting; None when T < 2."""
    return _one(R, "BWT")


def backward_transfer_trace(R: Matrix) -> float | None:
    """TRACE/MoRAM BWT = -(1/T) sum_j min(R[T][j] - R[j+1][j], 0), a non-negative magnitude; None when T < 2.

    The sum runs over all T tasks (the last term is 0 by construction) and the divisor counts the terms that
    could be computed, which is T for a complete matrix (as in the authors' ``collect_results.py``).
    """
    return _one(R, "BWT_trace")


def forward_transfer(R: Matrix) -> float | None:
    """FWT = mean_{j>=1} (R[j][j] - R[0][j]): zero-shot gain on task j from tasks 0..j-1; None when T < 2."""
    return _one(R, "FWT")


def forgetting(R: Matrix) -> float | None:
    """Chaudhry et al.'s forgetting = mean_{j<T-1} max_{j<=l<T-1} (R[l+1][j] - R[T][j]); None when T < 2.

    The maximum starts at the row where task j was learned: a higher zero-shot score before training on j is
    not something the model could forget.
    """
    return _one(R, "forgetting")


def learning_accuracy(R: Matrix) -> float | None:
    """LA = mean_j R[j+1][j], the score on each task right after learning it (plasticity)."""
    return _one(R, "LA")


def learning_accuracy_per_task(R: Matrix) -> list[float | None]:
    """``R[j+1][j]`` for every task j (``None`` where not evaluated)."""
    return [_scalar(v) for v in batch_metrics(R)["LA_per_task"][0]]


def forgetting_metrics(R: Matrix) -> dict[str, float | None]:
    """All summary metrics of ``R`` keyed as in ``FORGETTING_CONVENTIONS``."""
    values = batch_metrics(R)
    return {k: _scalar(values[k][0]) for k in METRIC_NAMES}
