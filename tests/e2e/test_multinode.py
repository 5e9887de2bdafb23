"""``mora-dist run`` across two real hosts (network namespaces on this machine, see ``launch/netns_hosts.sh``):
the deepspeed launcher with a hostfile (pdsh over ssh), ``torchrun --nnodes 2`` (c10d rendezvous, one torchrun
per host) and ``mpiexec`` with two hosts (Hydra over ssh), one process per host, gloo on the hosts' interface.
Each run must end with the adapters, losses, scores and report of the one-process run of the same stream.

The workers find the data through ``${MORA_DATA_ROOT}`` in the config, so a run passes only if the launcher
carried the environment to the other host (over ssh the remote shell starts with a bare environment).
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.support import CL_DATA
from tests.support.multinode_hosts import HOSTS
from tests.support.tiny_stream import assert_same_outcome, outcome, write_stream_config

pytestmark = [pytest.mark.multinode,
              pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")]
TIMEOUT = 300


def check_two_hosts(log: str, run_dir, name: str) -> None:
    """Rank 0 ran on mora-node1 and rank 1 on mora-node2, with the rendezvous on mora-node1."""
    for rank, host in enumerate(HOSTS):
        assert f"[mora-dist] rank {rank}/2 on {host} " in log, f"{name}: rank {rank} not on {host}:\n{log[-4000:]}"
    assert "rendezvous mora-node1:" in log, name
    assert json.loads((run_dir / "version.json").read_text())["world_size"] == 2


def test_deepspeed_launcher_with_a_hostfile(netns_hosts, tiny_stream_reference, tiny_model_dir, tmp_path):
    if shutil.which("pdsh") is None:
        pytest.skip("pdsh is not installed (launch/system_deps.sh installs it); the deepspeed launcher needs it")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    cfg = write_stream_config(tmp_path / "ds.yaml", tiny_model_dir, tmp_path / "run", zero_stage=3)
    proc = netns_hosts.run(1, ["bash", "launch/deepspeed.sh", "--hostfile", str(hostfile), "--", "run", str(cfg)],
                           timeout=TIMEOUT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "--master_addr mora-node1" in log  # the first host of the hostfile, not `hostname -I`
    check_two_hosts(log, tmp_path / "run", "deepspeed")
    assert_same_outcome(outcome(tmp_path / "run"), tiny_stream_reference, "deepspeed launcher, ZeRO-3")


def test_torchrun_on_each_host_with_c10d_rendezvous(netns_hosts, tiny_stream_reference, tiny_model_dir, tmp_path):
    cfg = write_stream_config(tmp_path / "tr.yaml", tiny_model_dir, tmp_path / "run", zero_stage=2)
    cmd = ["bash", "launch/torchrun.sh", "--nproc", "1", "--nnodes", "2", "--master-addr", HOSTS[0],
           "--master-port", "29411", "--", "run", str(cfg)]
    procs = [netns_hosts.popen(node, cmd, log=tmp_path / f"node{node}.log") for node in (1, 2)]
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(tmp_path / f"node{node}.log").read_text() for node in (1, 2)]
    assert codes == [0, 0], "\n\n".join(l[-4000:] for l in logs)
    check_two_hosts("\n".join(logs), tmp_path / "run", "torchrun")
    assert_same_outcome(outcome(tmp_path / "run"), tiny_stream_reference, "torchrun, ZeRO-2")


def test_mpiexec_with_two_hosts(netns_hosts, tiny_stream_reference, tiny_model_dir, tmp_path):
    cfg = write_stream_config(tmp_path / "mpi.yaml", tiny_model_dir, tmp_path / "run", zero_stage=3)
    proc = netns_hosts.run(1, ["bash", "launch/mpirun.sh", "-n", "2", "--hosts", ",".join(HOSTS), "--",
                               "run", str(cfg)], timeout=TIMEOUT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    check_two_hosts(log, tmp_path / "run", "mpiexec")
    assert_same_outcome(outcome(tmp_path / "run"), tiny_stream_reference, "mpiexec, ZeRO-3")
