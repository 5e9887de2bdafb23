"""Fixtures of the end-to-end tests: the one-process run of the tiny stream, two network-namespace hosts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import CL_DATA
from tests.support.multinode_hosts import SCRIPT, Hosts, unavailable_reason
from tests.support.tiny_stream import outcome, run_cmd, run_env, write_stream_config


@pytest.fixture(scope="session")
def tiny_stream_reference(tiny_model_dir, tmp_path_factory):
    """What one process makes of the tiny stream of ``tiny_stream.py`` (the yardstick of multi-worker runs)."""
    if not (CL_DATA / "FOMC").is_dir():
        pytest.skip(f"real data missing: {CL_DATA}")
    root = tmp_path_factory.mktemp("tiny_stream_single")
    cfg = write_stream_config(root / "run.yaml", tiny_model_dir, root / "run", zero_stage=0)
    proc = run_cmd([sys.executable, "-m", "mora_dist", "run", str(cfg)], run_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return outcome(root / "run")


@pytest.fixture(scope="module")
def netns_hosts(tmp_path_factory):
    """Two hosts for this module's tests, torn down (processes included) at its end even after failures."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"two network-namespace hosts cannot be created here: {reason}")
    state = tmp_path_factory.mktemp("netns_hosts")
    up = subprocess.run(["bash", str(SCRIPT), "up", str(state)], capture_output=True, text=True, timeout=120,
                        stdin=subprocess.DEVNULL)
    try:
        assert up.returncode == 0, f"netns_hosts.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield Hosts(state)
    finally:
        down = subprocess.run(["bash", str(SCRIPT), "down", str(state)], capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, f"netns_hosts.sh down failed:\n{down.stdout}\n{down.stderr}"
