"""Runs of ``mora-dist run`` on the tiny model: a two-task config, the command under each launcher, its outcome."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from tests.support import CL_DATA, REPO


def write_config(tmp_path: Path, model_dir: Path, run_dir: Path, data_root: Path = CL_DATA, **extra) -> Path:
    """A two-task run (FOMC, NumGLUE-cm) of the tiny model; ``extra`` sections are merged over the defaults."""
    cfg = {
        "run_dir": str(run_dir),
        "model": {"name": str(model_dir), "max_length": 96},
        "mora": {"r_task": 4, "k": 4},
        "train": {"max_steps": 4, "micro_batch_size": 2, "max_examples": 16, "checkpoint_every": 2,
                  "lr": 5e-3},
        "prune": {"max_examples": 8, "max_output_change": 0.05},
        "eval": {"max_examples": 4, "batch_size": 4},
        "data": {"root": str(data_root)},
        "tasks": [{"name": "FOMC", "max_new_tokens": 3}, {"name": "NumGLUE-cm", "max_new_tokens": 4}],
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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
    """The final losses of both tasks and the last adapter of a finished run of ``write_config``."""
    done = {d["stage"]: d for d in json.loads((run_dir / "state.json").read_text())["done"]}
    losses = [done[f"{k}/train"]["info"]["final_loss"] for k in ("00-FOMC", "01-NumGLUE-cm")]
    return losses, load_file(str(run_dir / "adapters" / "01-NumGLUE-cm" / "adapter.safetensors"))
