"""The orchestrator under the DeepSpeed engine: 2 CPU workers (gloo, torchrun on 127.0.0.1), ZeRO-2 and ZeRO-3,
against a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import CL_DATA, REPO
from test_orchestrator import write_config

pytestmark = pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")


def run_cli(cfg, nproc: int, *overrides, port: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MORA_DIST_FAULT"):
        env.pop(var, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "mora_dist", "run", str(cfg), *overrides]
    else:
        from mora_dist.distributed.env import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={port or free_port()}", "-m", "mora_dist", "run", str(cfg), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def outcome(run_dir):
    done = {d["stage"]: d for d in json.loads((run_dir / "state.json").read_text())["done"]}
    losses = [done[f"{k}/train"]["info"]["final_loss"] for k in ("00-FOMC", "01-NumGLUE-cm")]
    return losses, load_file(str(run_dir / "adapters" / "01-NumGLUE-cm" / "adapter.safetensors"))


def test_two_workers_zero2_and_zero3_match_one_process(tiny_model_dir, tmp_path):
    results = {}
    for name, nproc, stage in [("single", 1, 0), ("zero2", 2, 2), ("zero3", 2, 3)]:
        run_dir = tmp_path / name
        cfg = write_config(tmp_path, tiny_model_dir, run_dir)
        # dropout off: its masks depend on how examples are spread over workers
        proc = run_cli(cfg, nproc, "train.global_batch_size=4", "prune.enabled=false", "mora.dropout=0.0",
                       f"distributed.zero_stage={stage}")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert (run_dir / "report" / "report.json").is_file()
        results[name] = outcome(run_dir)
    assert (tmp_path / "zero3" / "ds_config.json").is_file()
    assert json.loads((tmp_path / "zero3" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    ref_losses, ref_adapter = results["single"]
    for name in ("zero2", "zero3"):
        losses, adapter = results[name]
        assert losses == pytest.approx(ref_losses, rel=1e-4), name
        for key, tensor in ref_adapter.items():
            torch.testing.assert_close(adapter[key], tensor, atol=1e-4, rtol=1e-3, msg=f"{name} {key}")
