"""Two real hosts on one machine for multi-node tests: ``launch/netns_hosts.sh`` and a handle on its hosts.

The fixture ``netns_hosts`` (in ``tests/e2e/conftest.py``) creates the hosts once per module (two network
namespaces joined by a veth pair, ``mora-node1`` = 10.213.0.1 and ``mora-node2`` = 10.213.0.2, interface ``mora0``
on both, sshd on each) and removes them, with every process still running there, when the module ends, whether its
tests passed or not. Where hosts cannot be made (not root, no ``ip``, no sshd: run ``launch/system_deps.sh``) the
tests that use it skip with the reason.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
