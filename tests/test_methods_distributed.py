"""Baselines under the DeepSpeed engine (2 CPU workers, ZeRO-3) against a one-process run with the same global
batch; O-LoRA refuses several workers."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support import CL_DATA
from tests.support.runs import outcome, run_cli, write_config

pytestmark = pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")


@pytest.mark.parametrize("method", ["seq_lora", "moe_lora"])
def test_baseline_under_zero3_matches_one_process(tiny_model_dir, tmp_path, method):
    results = {}
    for name, launcher, stage in [("single", "single", 0), ("zero3", "deepspeed", 3)]:
        run_dir = tmp_path / name
        cfg = write_config(tmp_path, tiny_model_dir, run_dir)
        proc = run_cli(cfg, launcher, "train.global_batch_size=4", "mora.dropout=0.0", f"method={method}",
                       f"distributed.zero_stage={stage}")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        results[name] = outcome(run_dir)
    (ref_losses, ref_adapter), (losses, adapter) = results["single"], results["zero3"]
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert adapter.keys() == ref_adapter.keys()
    assert any(k.endswith(".router") for k in adapter) == (method == "moe_lora")
    for key, tensor in ref_adapter.items():
        torch.testing.assert_close(adapter[key], tensor, atol=1e-4, rtol=1e-3, msg=key)
    blocks = json.loads((tmp_path / "zero3" / "adapters" / "01-NumGLUE-cm" / "adapter.json").read_text())["blocks"]
    assert [b["name"] for b in blocks] == (["FOMC"] if method == "seq_lora" else ["FOMC", "NumGLUE-cm"])


def test_olora_refuses_several_workers(tiny_model_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_model_dir, tmp_path / "run")
    proc = run_cli(cfg, "torchrun", "method=olora", "train.global_batch_size=4")
    assert proc.returncode != 0
    assert "method=olora runs in one process only" in proc.stderr
    assert not (tmp_path / "run").exists()
