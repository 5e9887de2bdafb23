"""Two real hosts on one machine for multi-node tests: ``launch/netns_hosts.sh`` behind a pytest fixture.

The fixture creates the hosts once per module (two network namespaces joined by a veth pair, ``mora-node1`` =
10.213.0.1 and ``mora-node2`` = 10.213.0.2, interface ``mora0`` on both, sshd on each) and removes them, with
every process still running there, when the module ends, whether its tests passed or not. Where hosts cannot be
made (not root, no ``ip``, no sshd: run ``launch/system_deps.sh``) the tests that use it skip with the reason.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.tiny_stream import run_cmd, run_env

SCRIPT = REPO / "launch" / "netns_hosts.sh"
HOSTS = ("mora-node1", "mora-node2")
IFNAME = "mora0"


def unavailable_reason() -> str | None:
    """Why two hosts cannot be made here, or ``None`` if they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    proc = subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True, text=True, timeout=60)
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip() or "netns_hosts.sh check failed"


def node_env(**extra: str) -> dict[str, str]:
    """The environment a node's processes start from (``tiny_stream.run_env``), gloo on the hosts' interface."""
    return run_env(GLOO_SOCKET_IFNAME=IFNAME, **extra)


@dataclass
class Hosts:
    """Handle on the two hosts: ``popen(node, cmd)`` runs ``cmd`` on ``mora-node{node}`` (1 or 2)."""

    state: Path

    def command(self, node: int, cmd: list[str]) -> list[str]:
        return ["bash", str(SCRIPT), "exec", str(self.state), str(node), *cmd]

    def popen(self, node: int, cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None):
        out = open(log, "w") if log is not None else subprocess.PIPE
        return subprocess.Popen(self.command(node, cmd), cwd=REPO, env=env or node_env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True)

    def run(self, node: int, cmd: list[str], env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
        return run_cmd(self.command(node, cmd), env or node_env(), timeout)


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
