"""The orchestrator under the DeepSpeed engine: 2 CPU workers (gloo, torchrun on 127.0.0.1), ZeRO-2 and ZeRO-3,
against a 1-process run with the same global batch."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support import CL_DATA
from tests.support.runs import outcome, run_cli, write_config

pytestmark = pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")


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


def test_deepspeed_settings_for_the_world_size_are_checked_before_the_run_directory(tiny_model_dir, tmp_path):
    """16-bit training without ZeRO (DeepSpeed's 16-bit optimizer keeps state a mid-task checkpoint cannot reach):
    refused on two workers with one error naming the fields and the fix; no run directory is started."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model_dir, run_dir)
    proc = run_cli(cfg, "torchrun", "train.global_batch_size=4", "model.dtype=bfloat16", "distributed.zero_stage=0")
    assert proc.returncode != 0
    assert "distributed.zero_stage=0 with model.dtype=bfloat16 on 2 workers" in proc.stderr
    assert "set distributed.zero_stage=1" in proc.stderr
    assert not run_dir.exists()
