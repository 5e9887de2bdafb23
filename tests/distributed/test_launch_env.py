"""What the launchers carry to other nodes, and where they put the rendezvous on several hosts."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO
from mora_dist.distributed import launch_cmd as L


def test_forwarded_env_carries_the_run_environment_and_user_lines_win(tmp_path):
    env = {"PATH": "/venv/bin:/usr/bin", "TORCH_EXTENSIONS_DIR": "/x/ext", "MORA_DATA_ROOT": "/data",
           "GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "4",
           "HOME": "/root", "SSH_AUTH_SOCK": "/tmp/agent", "MORA_ODD": 'has "quotes"', "MORA_DOLLAR": "a$b"}
    user = tmp_path / ".deepspeed_env"
    user.write_text("OMP_NUM_THREADS=8\nMY_VAR=1")
    lines = L.forwarded_env(env, extra_files=[str(user), str(tmp_path / "absent")]).splitlines()
    assert lines[:6] == ["GLOO_SOCKET_IFNAME=ib0", "HF_HUB_OFFLINE=1", "MORA_DATA_ROOT=/data",
                         "NCCL_SOCKET_IFNAME=ib0", "OMP_NUM_THREADS=4", "PATH=/venv/bin:/usr/bin"]
    assert lines[6:] == ["TORCH_EXTENSIONS_DIR=/x/ext", "OMP_NUM_THREADS=8", "MY_VAR=1"]  # the user's come last
    # the deepspeed launcher reads KEY=VALUE lines; later ones override earlier ones
    exports = dict(line.split("=", 1) for line in lines)
    assert exports["OMP_NUM_THREADS"] == "8" and "HOME" not in exports and "MORA_ODD" not in exports


def test_rendezvous_on_the_first_host(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nnode07 slots=2\nnode08 slots=2\n")
    cmd = L.deepspeed_cmd(["run", "c.yaml"], hostfile=str(hostfile))
    assert cmd[cmd.index("--master_addr") + 1] == "node07"
    given = L.deepspeed_cmd(["run", "c.yaml"], hostfile=str(hostfile), master_addr="10.0.0.7")
    assert given[given.index("--master_addr") + 1] == "10.0.0.7"
    mpi = L.mpirun_cmd(["run", "c.yaml"], n=4, hosts=["node07:2", "node08:2"], python="py")
    assert mpi[:8] == ["mpiexec", "-n", "4", "-hosts", "node07:2,node08:2", "-genv", "MASTER_ADDR", "node07"]
    assert "MASTER_PORT" not in mpi  # rank 0 picks a free port and tells the others through mpi4py


def test_deepspeed_script_hands_the_env_file_to_the_launcher(tmp_path):
    """launch/deepspeed.sh with a hostfile: DS_ENV_FILE names a file of the forwarded variables while the
    launcher runs, and the file is gone afterwards."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "deepspeed"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncp "$DS_ENV_FILE" {tmp_path}/seen\n'
                    f'echo "$DS_ENV_FILE" > {tmp_path}/path\n')
    fake.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node07 slots=1\nnode08 slots=1\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               PYTHONPATH=str(REPO), MORA_DATA_ROOT="/data/x", TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "launch" / "deepspeed.sh"), "--hostfile", str(hostfile), "--", "run",
                           "c.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--master_addr node07" in (tmp_path / "args").read_text()
    assert "MORA_DATA_ROOT=/data/x" in (tmp_path / "seen").read_text().splitlines()
    assert not os.path.exists((tmp_path / "path").read_text().strip())  # removed when the launcher ended
