"""A tiny two-task stream (FOMC → NumGLUE-cm on the tiny model of ``conftest.tiny_model_dir``) and what a finished
run of it produced, for the tests that compare runs on different launchers and world sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.support import CL_DATA, REPO

TASKS = ("FOMC", "NumGLUE-cm")
# ZeRO's tolerance against one process (partitioned reductions sum in another order)
LOSS_RTOL, ADAPTER_ATOL, ADAPTER_RTOL = 1e-4, 1e-4, 1e-3


def run_env(**extra: str) -> dict[str, str]:
    """The environment runs start from: no launcher variables left over, the venv first on PATH, the repository
    importable, the extension cache and data, offline, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MORA_DIST_FAULT")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
               MORA_DATA_ROOT=str(CL_DATA), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cmd(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; past ``timeout`` the whole group is killed and the test fails."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {timeout}s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def write_stream_config(path: Path, model_dir: Path, run_dir: Path, *, data_root: str = "${MORA_DATA_ROOT}",
                        steps: int = 4, checkpoint_every: int = 2, zero_stage: int = 2) -> Path:
    """A config whose runs agree on any world size: a fixed global batch of 4, dropout and pruning off.

    ``data_root`` defaults to the variable, so a worker finds the data only if the launcher carried
    ``MORA_DATA_ROOT`` to it.
    """
    cfg = {
        "run_dir": str(run_dir),
        "model": {"name": str(model_dir), "max_length": 96},
        "mora": {"r_task": 4, "k": 4, "dropout": 0.0},
        "train": {"max_steps": steps, "micro_batch_size": 2, "global_batch_size": 4, "max_examples": 16,
                  "checkpoint_every": checkpoint_every, "lr": 5e-3},
        "prune": {"enabled": False, "max_examples": 8},
        "eval": {"max_examples": 4, "batch_size": 4},
        "distributed": {"zero_stage": zero_stage},
        "data": {"root": data_root},
        "tasks": [{"name": "FOMC", "max_new_tokens": 3}, {"name": "NumGLUE-cm", "max_new_tokens": 4}],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def outcome(run_dir: Path) -> dict:
    """Final losses per task, the last adapter, every evaluation's scores and the report's matrix."""
    done = {d["stage"]: d for d in json.loads((run_dir / "state.json").read_text())["done"]}
    scores = {f.name: json.loads(f.read_text())["mora_dist"]["in_domain"]
              for f in sorted((run_dir / "eval").glob("stage_*.json")) if not f.name.endswith("samples.json")}
    return {"losses": [done[f"{i:02d}-{t}/train"]["info"]["final_loss"] for i, t in enumerate(TASKS)],
            "adapter": load_file(str(run_dir / "adapters" / f"{len(TASKS) - 1:02d}-{TASKS[-1]}" /
                                     "adapter.safetensors")),
            "scores": scores,
            "matrix": json.loads((run_dir / "report" / "report.json").read_text())["matrix"]}


def assert_same_outcome(got: dict, ref: dict, name: str) -> None:
    """``got`` equals ``ref`` within ZeRO's tolerance (losses, adapters) and exactly (scores, report)."""
    assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL), name
    assert got["adapter"].keys() == ref["adapter"].keys(), name
    for key, tensor in ref["adapter"].items():
        torch.testing.assert_close(got["adapter"][key], tensor, atol=ADAPTER_ATOL, rtol=ADAPTER_RTOL,
                                   msg=lambda m: f"{name} {key}: {m}")
    assert got["scores"] == ref["scores"], name
    assert got["matrix"] == ref["matrix"], name
