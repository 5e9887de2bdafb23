"""The per-step metrics file: truncation on resume (lines beyond the checkpoint, later tasks, a partial line),
the TensorBoard writer is optional, and the report's loss-curve figure."""

from __future__ import annotations

import json

from mora_dist.run.curves import TrainingCurves, plot_loss_curves, read_metrics


def _lines(path):
    return [(r["task_index"], r["step"]) for r in read_metrics(path)]


def test_resume_drops_the_steps_it_trains_again(tmp_path):
    curves = TrainingCurves(tmp_path)
    curves.begin_task(0, "a", 0)
    for step in range(1, 4):
        curves.log_step(step, 3, 1.0 / step, 1e-3, 0.5, 100, 0.1)
    curves.begin_task(1, "b", 0)
    for step in range(1, 6):  # steps 4 and 5 are written, then a crash before their checkpoint (at step 3)
        curves.log_step(step, 6, 2.0, 1e-3, None, 100, 0.1)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"task": "b", "task_index": 1, "st')  # killed inside a write
    curves.close()
    assert _lines(tmp_path)[-1] == (1, 5)
    resumed = TrainingCurves(tmp_path)
    resumed.begin_task(1, "b", 3)
    assert _lines(tmp_path) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    for step in range(4, 7):
        resumed.log_step(step, 6, 2.0, 1e-3, 0.1, 100, 0.0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [(json.loads(l)["task_index"], json.loads(l)["step"]) for l in lines] == \
        [(0, s) for s in (1, 2, 3)] + [(1, s) for s in range(1, 7)]
    last = json.loads(lines[-1])
    assert last["tokens_per_s"] is None and last["grad_norm"] == 0.1 and last["loss"] == 2.0
    # a task restarted from scratch (crash before its first checkpoint) loses its lines and every later task's
    TrainingCurves(tmp_path).begin_task(0, "a", 0)
    assert _lines(tmp_path) == []


def test_non_finite_values_are_null_and_the_figure_has_a_panel_per_task(tmp_path):
    curves = TrainingCurves(tmp_path)
    for index, name in enumerate(["a", "b", "c"]):
        curves.begin_task(index, name, 0)
        for step in range(1, 4):
            curves.log_step(step, 3, float("nan") if step == 2 else 1.0, 1e-3, float("inf"), 10, 0.5)
    rec = read_metrics(tmp_path)[1]
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["tokens_per_s"] == 20.0
    fig = plot_loss_curves(tmp_path, tmp_path)
    assert fig is not None and fig.name == "loss_curves.png" and fig.stat().st_size > 1000
    assert plot_loss_curves(tmp_path / "empty", tmp_path) is None
