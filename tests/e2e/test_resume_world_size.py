"""A task killed mid-way resumes on another number of workers: 2 → 1 (a ZeRO-2 or ZeRO-3 checkpoint continued by
the one-process trainer) and 1 → 2 (a one-process checkpoint continued under ZeRO-2 or ZeRO-3), each ending with
the adapters, losses, scores and report of an uninterrupted one-process run (within ZeRO's tolerance). Workers on 127.0.0.1
through ``launch/torchrun.sh``; ``MORA_DIST_FAULT`` kills every worker after step 3 of the first task, one step
after its step-2 checkpoint."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import torch

from tests.support import CL_DATA
from mora_dist.distributed.env import free_port
from mora_dist.run import portable
from tests.support.tiny_stream import assert_same_outcome, outcome, run_cmd, run_env, write_stream_config

pytestmark = pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")
TIMEOUT = 300
FAULT = "train_step:FOMC#3"


def run(cfg, workers: int, fault: str | None = None):
    env = run_env(**({"MORA_DIST_FAULT": fault} if fault else {}))
    if workers == 1:
        cmd = [sys.executable, "-m", "mora_dist", "run", str(cfg)]
    else:
        cmd = ["bash", "launch/torchrun.sh", "--nproc", str(workers), "--master-port", str(free_port()), "--",
               "run", str(cfg)]
    return run_cmd(cmd, env, TIMEOUT)


def config(tmp_path, model_dir, name: str, stage: int):
    return write_stream_config(tmp_path / f"{name}.yaml", model_dir, tmp_path / name, zero_stage=stage)


def kill_then_resume(tmp_path, model_dir, first: int, then: int, stage: int) -> dict:
    cfg = config(tmp_path, model_dir, "run", stage)
    crashed = run(cfg, first, fault=FAULT)
    if first == 1:
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    else:
        assert crashed.returncode != 0, crashed.stderr[-3000:]
    ckpt = tmp_path / "run" / "ckpt" / "00-FOMC" / "step-000002"
    info = json.loads((ckpt / "trainer_state.json").read_text())
    assert (info["step"], info["world_size"], info["global_batch"], info["opt_step"]) == (2, first, 4, 2)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert "00-FOMC/train" not in {d["stage"] for d in state["done"]}  # it really stopped inside the task
    resumed = run(cfg, then)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert f"FOMC: resumed at step 2 of 4 on {then} worker(s)" in resumed.stdout + resumed.stderr
    return outcome(tmp_path / "run")


@pytest.mark.parametrize("first,then,stage", [(2, 1, 2), (2, 1, 3), (1, 2, 2), (1, 2, 3)],
                         ids=["2to1-zero2", "2to1-zero3", "1to2-zero2", "1to2-zero3"])
def test_killed_mid_task_resumes_on_another_world_size(tiny_stream_reference, tiny_model_dir, tmp_path, first,
                                                        then, stage):
    got = kill_then_resume(tmp_path, tiny_model_dir, first, then, stage)
    assert_same_outcome(got, tiny_stream_reference, f"{first} -> {then} workers, ZeRO-{stage}")


def test_another_global_batch_is_refused_with_the_fix(tmp_path):
    """Without train.global_batch_size the data plan depends on the workers: such a checkpoint is refused."""
    moments = {"w": {"exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)}}
    portable.write_state(tmp_path, portable.PortableState(3, 2, 8, 3, moments, {}, [torch.get_rng_state()] * 2))
    state = portable.read_state(tmp_path, ["w"], 8)
    assert state.step == 3 and torch.equal(state.moments["w"]["exp_avg"], torch.ones(2))
    assert torch.equal(state.rng_state(1, 2), state.rng[1])
    assert not torch.equal(state.rng_state(0, 1), state.rng[0])  # another world size: derived, per rank
    with pytest.raises(portable.ResumeError, match="global batch of 8.*2 workers.*train.global_batch_size"):
        portable.read_state(tmp_path, ["w"], 4)
    with pytest.raises(portable.ResumeError, match="trainable parameters differ"):
        portable.read_state(tmp_path, ["v"], 8)
