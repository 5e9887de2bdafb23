"""Continual-learning summary metrics over a score matrix (DESIGN §5).

Matrix layout used everywhere in this package: ``R`` has ``T + 1`` rows and ``T`` columns for a stream of ``T``
tasks. Row 0 is the base model before any training; row ``i + 1`` is the model after training tasks ``0..i``;
column ``j`` is task ``j``. An entry is ``None`` where that task was not evaluated at that stage.

DESIGN §5 writes ``D[i][j]`` for "after tasks 0..i" and ``D[-1][j]`` for the base model, so ``D[i][j] = R[i+1][j]``
and ``D[-1][j] = R[0][j]``. Each metric below is the DESIGN formula in that notation. Terms whose entries are
``None`` are left out of their mean (and out of its divisor); a metric is ``None`` when no term is left or when it
is undefined for the stream length (BWT, BWT_trace, FWT and forgetting need ``T >= 2``).
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]

FORGETTING_CONVENTIONS: dict[str, str] = {
    "AP": "Average performance (TRACE: OP) = mean_j R[T][j]: mean final score over all tasks; higher is better.",
    "BWT": "Backward transfer, Lopez-Paz & Ranzato (2017) = mean_{j<T-1} (R[T][j] - R[j+1][j]): final score minus "
           "score right after learning task j, over all but the last task. Negative means forgetting.",
    "BWT_trace": "Backward transfer as TRACE/MoRAM report it = -(1/T) sum_j min(R[T][j] - R[j+1][j], 0): only drops "
                 "count, as a positive magnitude, averaged over all T tasks (the last contributes 0). Lower is better.",
    "FWT": "Forward transfer = mean_{j>=1} (R[j][j] - R[0][j]): score on task j just before training on it (after "
           "tasks 0..j-1) minus the base model's score. Positive means earlier tasks helped.",
    "forgetting": "Forgetting (Chaudhry et al. 2018) = mean_{j<T-1} max_{l<T-1} (R[l+1][j] - R[T][j]): best score "
                  "on task j at any stage before the last one minus the final score. Positive means forgetting.",
}
# Row indices in the conventions above are rows of the (T+1)-row matrix: R[0] = base model, R[i+1] = after task i.


def _n_tasks(R: Matrix) -> int:
    if len(R) < 2:
        raise ValueError(f"score matrix needs T+1 >= 2 rows (base model + one per task), got {len(R)}")
    T = len(R) - 1
    for i, row in enumerate(R):
        if len(row) != T:
            raise ValueError(f"score matrix row {i} has {len(row)} entries, expected T={T} (one per task)")
    return T


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def average_performance(R: Matrix) -> float | None:
    """AP = mean over tasks of the final row (TRACE's OP). See ``FORGETTING_CONVENTIONS['AP']``."""
    T = _n_tasks(R)
    return _mean([v for v in R[T] if v is not None])


def backward_transfer(R: Matrix) -> float | None:
    """Lopez-Paz BWT = mean_{j<T-1} (R[T][j] - R[j+1][j]); negative means forgetting; None when T < 2."""
    T = _n_tasks(R)
    if T < 2:
        return None
    return _mean([d for j in range(T - 1) if (d := _diff(R[T][j], R[j + 1][j])) is not None])


def backward_transfer_trace(R: Matrix) -> float | None:
    """TRACE/MoRAM BWT = -(1/T) sum_j min(R[T][j] - R[j+1][j], 0), a non-negative magnitude; None when T < 2.

    The sum runs over all T tasks (the last term is 0 by construction) and the divisor counts the terms that
    could be computed, which is T for a complete matrix.
    """
    T = _n_tasks(R)
    if T < 2:
        return None
    terms = [d for j in range(T) if (d := _diff(R[T][j], R[j + 1][j])) is not None]
    if not terms:
        return None
    return -sum(min(d, 0.0) for d in terms) / len(terms)


def forward_transfer(R: Matrix) -> float | None:
    """FWT = mean_{j>=1} (R[j][j] - R[0][j]): zero-shot gain on task j from tasks 0..j-1; None when T < 2."""
    T = _n_tasks(R)
    if T < 2:
        return None
    return _mean([d for j in range(1, T) if (d := _diff(R[j][j], R[0][j])) is not None])


def forgetting(R: Matrix) -> float | None:
    """Forgetting = mean_{j<T-1} max_{l<T-1} (R[l+1][j] - R[T][j]); rows before the final one; None when T < 2."""
    T = _n_tasks(R)
    if T < 2:
        return None
    values = []
    for j in range(T - 1):
        if R[T][j] is None:
            continue
        diffs = [R[l + 1][j] - R[T][j] for l in range(T - 1) if R[l + 1][j] is not None]
        if diffs:
            values.append(max(diffs))
    return _mean(values)


def forgetting_metrics(R: Matrix) -> dict[str, float | None]:
    """All five summary metrics of ``R`` keyed as in ``FORGETTING_CONVENTIONS``."""
    return {
        "AP": average_performance(R),
        "BWT": backward_transfer(R),
        "BWT_trace": backward_transfer_trace(R),
        "FWT": forward_transfer(R),
        "forgetting": forgetting(R),
    }
