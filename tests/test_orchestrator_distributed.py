"""The orchestrator under the DeepSpeed engine: 2 CPU workers (gloo, torchrun on 127.0.0.1), ZeRO-2 and ZeRO-3,
against a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CL_DATA, REPO
from test_orchestrator import write_config

pytestmark = pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")


def run_cli(cfg, launcher: str, *overrides) -> subprocess.CompletedProcess:
    """``mora-dist run`` in one process, or with 2 workers through one of the launch/ scripts."""
    from mora_dist.distributed.env import free_port

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MORA_DIST_FAULT"):
        env.pop(var, None)
    args = ["run", str(cfg), *overrides]
    cmd = {
        "single": [sys.executable, "-m", "mora_dist", *args],
        "torchrun": ["bash", "launch/torchrun.sh", "--nproc", "2", "--master-port", env["MASTER_PORT"], "--", *args],
        "deepspeed": ["bash", "launch/deepspeed.sh", "--gpus", "2", "--master-port", env["MASTER_PORT"], "--", *args],
        "mpirun": ["bash", "launch/mpirun.sh", "-n", "2", "--", *args],
    }[launcher]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def outcome(run_dir):
    done = {d["stage"]: d for d in json.loads((run_dir / "state.json").read_text())["done"]}
    losses = [done[f"{k}/train"]["info"]["final_loss"] for k in ("00-FOMC", "01-NumGLUE-cm")]
    return losses, load_file(str(run_dir / "adapters" / "01-NumGLUE-cm" / "adapter.safetensors"))


def test_every_launcher_runs_the_stream_and_matches_one_process(tiny_model_dir, tmp_path):
    """The one entry point under torchrun (ZeRO-2), the deepspeed launcher (ZeRO-3) and mpirun (ZeRO-3)."""
    results = {}
    for name, launcher, stage in [("single", "single", 0), ("zero2", "torchrun", 2), ("zero3", "deepspeed", 3),
                                  ("zero3_mpi", "mpirun", 3)]:
        run_dir = tmp_path / name
        cfg = write_config(tmp_path, tiny_model_dir, run_dir)
        # dropout off: its masks depend on how examples are spread over workers
        proc = run_cli(cfg, launcher, "train.global_batch_size=4", "prune.enabled=false", "mora.dropout=0.0",
                       f"distributed.zero_stage={stage}")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert (run_dir / "report" / "report.json").is_file()
        results[name] = outcome(run_dir)
    assert (tmp_path / "zero3" / "ds_config.json").is_file()
    assert json.loads((tmp_path / "zero3" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    ref_losses, ref_adapter = results["single"]
    for name in ("zero2", "zero3", "zero3_mpi"):
        assert json.loads((tmp_path / name / "version.json").read_text())["world_size"] == 2
        losses, adapter = results[name]
        assert losses == pytest.approx(ref_losses, rel=1e-4), name
        for key, tensor in ref_adapter.items():
            torch.testing.assert_close(adapter[key], tensor, atol=1e-4, rtol=1e-3, msg=f"{name} {key}")
