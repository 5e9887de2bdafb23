"""Command lines for every supported launcher, generated in one place so they can be unit-tested.

The shell scripts in ``launch/`` are thin wrappers around this module::

    python -m mora_dist.distributed.launch_cmd deepspeed --gpus 2 -- run configs/x.yaml train.lr=1e-4
    python -m mora_dist.distributed.launch_cmd torchrun --nproc 2 -- run configs/x.yaml
    python -m mora_dist.distributed.launch_cmd mpirun -n 2 -- run configs/x.yaml
    python -m mora_dist.distributed.launch_cmd hostfile --slurm-nodelist 'gpu[01-02]' --slots 4
    python -m mora_dist.distributed.launch_cmd envfile > env   # what the deepspeed launcher forwards to nodes

Each prints one shell-quoted command. Every worker runs ``python -m <module> <args>`` (the product's entry
point is ``mora_dist``, i.e. ``python -m mora_dist run CONFIG [key=value ...]``); ranks are discovered by
``mora_dist.distributed.env.init_distributed``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Sequence

DEFAULT_MODULE = "mora_dist"
DEFAULT_PORT = 29500
# What a worker on another node needs from the launching shell: the venv (PATH), the caches and data, the
# offline switches and the network interface choice. The deepspeed launcher forwards only PYTHON* by itself;
# mpiexec (Hydra) forwards everything; torchrun and srun are started in a shell of each node.
FORWARD_VARS = ("PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS",
                "TOKENIZERS_PARALLELISM")
FORWARD_PREFIXES = ("MORA_", "GLOO_", "NCCL_", "HF_", "TRANSFORMERS_")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list (``gpu[01-03,07],login1``) like ``scontrol show hostnames`` does.

    Handles one bracket group per host name, ranges with zero padding, and comma-separated items.
    """
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        if "[" in suffix:
            raise ValueError(f"node list {nodelist!r}: more than one bracket group in {item!r}; use scontrol "
                             "show hostnames")
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise ValueError(f"node list {nodelist!r}: empty range {part!r}")
                width = len(lo)
                hosts += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    if not hosts:
        raise ValueError(f"node list {nodelist!r} names no host")
    return hosts


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    """A DeepSpeed hostfile: one ``host slots=N`` line per node."""
    if slots < 1:
        raise ValueError(f"slots={slots}: each node needs at least one slot (GPUs or processes per node)")
    if not hosts:
        raise ValueError("a hostfile needs at least one host")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"duplicate hosts in {list(hosts)}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def parse_hostfile(text: str) -> list[tuple[str, int]]:
    """``[(host, slots)]`` of a DeepSpeed hostfile (comments and blank lines skipped)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m:
            raise ValueError(f"hostfile line {n}: {line!r} is not 'host slots=N'")
        out.append((m.group(1), int(m.group(2))))
    return out


def first_host(hostfile: str) -> str | None:
    """The first host of a DeepSpeed hostfile (the rendezvous), or ``None`` if it cannot be read here."""
    try:
        hosts = parse_hostfile(open(hostfile).read())
    except OSError:
        return None
    return hosts[0][0] if hosts else None


def forwarded_env(environ: dict | None = None, extra_files: Sequence[str] = ()) -> str:
    """The ``.deepspeed_env`` text that carries this shell's run environment to every node (``KEY=VALUE`` lines).

    The deepspeed launcher exports these lines before it starts each node's processes over ssh (pdsh).
    ``extra_files`` (the user's own ``.deepspeed_env`` files, if any) are appended, so their values win.
    Values the launcher's quoting cannot carry (quotes, ``$``, backslashes, new lines) are left out.
    """
    environ = dict(os.environ if environ is None else environ)
    lines = []
    for key in sorted(environ):
        if key in FORWARD_VARS or key.startswith(FORWARD_PREFIXES):
            value = environ[key]
            if not re.search(r'["$`\\\n]', value):
                lines.append(f"{key}={value}\n")
    for path in extra_files:
        if os.path.isfile(path):
            text = open(path).read()
            lines.append(text if text.endswith("\n") or not text else text + "\n")
    return "".join(lines)


def deepspeed_cmd(args: Sequence[str], *, gpus: int | None = None, hostfile: str | None = None,
                  master_addr: str | None = None, master_port: int = DEFAULT_PORT, module: str = DEFAULT_MODULE,
                  launcher: str | None = None) -> list[str]:
    """The deepspeed launcher: one node (``gpus`` processes on localhost) or the nodes of ``hostfile``.

    On one node the rendezvous is 127.0.0.1 unless ``master_addr`` says otherwise; with a hostfile it is the
    first host of the file (DeepSpeed itself would take the first address ``hostname -I`` prints there, which can
    be an interface the other nodes cannot reach). ``launcher`` picks the multi-node backend (pdsh by default,
    ``slurm``, ``openmpi``).
    """
    cmd = ["deepspeed"]
    if hostfile is not None:
        cmd += ["--hostfile", hostfile]
        if launcher:
            cmd += ["--launcher", launcher]
        master_addr = master_addr or first_host(hostfile)
        if master_addr:
            cmd += ["--master_addr", master_addr]
    else:
        cmd += ["--num_gpus", str(gpus or 1), "--master_addr", master_addr or "127.0.0.1"]
    cmd += ["--master_port", str(master_port), "--no_local_rank", "--module", module]
    return cmd + list(args)


def torchrun_cmd(args: Sequence[str], *, nproc: int, nnodes: int = 1, node_rank: int | None = None,
                 master_addr: str = "127.0.0.1", master_port: int = DEFAULT_PORT, module: str = DEFAULT_MODULE,
                 rdzv_id: str | None = None) -> list[str]:
    """torchrun: static rendezvous on one node; on several nodes a c10d rendezvous at ``master_addr``."""
    cmd = ["torchrun", "--nproc_per_node", str(nproc)]
    if nnodes == 1:
        cmd += ["--nnodes", "1", "--master_addr", master_addr, "--master_port", str(master_port)]
    else:
        cmd += ["--nnodes", str(nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master_addr}:{master_port}",
                "--rdzv_id", rdzv_id or "mora-dist"]
        if node_rank is not None:
            cmd += ["--node_rank", str(node_rank)]
    return cmd + ["-m", module] + list(args)


def mpirun_cmd(args: Sequence[str], *, n: int, hosts: Sequence[str] | None = None, mpiexec: str = "mpiexec",
               python: str | None = None, module: str = DEFAULT_MODULE, master_addr: str | None = None,
               master_port: int | None = None) -> list[str]:
    """mpiexec (MPICH/Hydra syntax; Open MPI accepts ``-n`` and ``-hosts`` as ``--host``).

    Ranks are read through mpi4py; MASTER_ADDR/MASTER_PORT are passed with ``-genv`` (MASTER_ADDR defaults to the
    first of ``hosts``, where Hydra places rank 0; without hosts, 127.0.0.1, and a port chosen by rank 0).
    Hydra forwards the launching shell's whole environment to every rank.
    """
    if n < 1:
        raise ValueError(f"n={n}: at least one process")
    cmd = [mpiexec, "-n", str(n)]
    if hosts:
        cmd += ["-hosts", ",".join(hosts)]
        master_addr = master_addr or hosts[0].split(":", 1)[0]  # Hydra's "host:procs"
    if master_addr:
        cmd += ["-genv", "MASTER_ADDR", master_addr]
    if master_port:
        cmd += ["-genv", "MASTER_PORT", str(master_port)]
    return cmd + [python or sys.executable, "-m", module] + list(args)


def srun_torchrun_cmd(args: Sequence[str], *, nodes: int, gpus_per_node: int, master_addr: str,
                      master_port: int = DEFAULT_PORT, module: str = DEFAULT_MODULE) -> list[str]:
    """Slurm without ssh: one torchrun per node via srun, rendezvous (c10d) on the first node."""
    inner = torchrun_cmd(args, nproc=gpus_per_node, nnodes=nodes, master_addr=master_addr,
                         master_port=master_port, module=module, rdzv_id="${SLURM_JOB_ID}")
    return ["srun", "--nodes", str(nodes), "--ntasks-per-node", "1", "bash", "-c", shlex.join(inner)
            .replace("'${SLURM_JOB_ID}'", "${SLURM_JOB_ID}")]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m mora_dist.distributed.launch_cmd", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    d = sub.add_parser("deepspeed")
    d.add_argument("--gpus", type=int, default=None)
    d.add_argument("--hostfile")
    d.add_argument("--launcher")
    t = sub.add_parser("torchrun")
    t.add_argument("--nproc", type=int, required=True)
    t.add_argument("--nnodes", type=int, default=1)
    m = sub.add_parser("mpirun")
    m.add_argument("-n", type=int, required=True)
    m.add_argument("--hosts")
    s = sub.add_parser("srun-torchrun")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, required=True)
    for q in (d, t, m, s):
        q.add_argument("--master-addr")
        q.add_argument("--master-port", type=int, default=None)
        q.add_argument("--module", default=DEFAULT_MODULE)
    h = sub.add_parser("hostfile")
    h.add_argument("--slurm-nodelist", help="compressed list (SLURM_JOB_NODELIST)")
    h.add_argument("--hosts", help="comma-separated host names (e.g. from scontrol show hostnames)")
    h.add_argument("--slots", type=int, required=True)
    sub.add_parser("envfile", help="print the .deepspeed_env lines that carry this environment to other nodes")
    a = p.parse_args(argv)
    port = getattr(a, "master_port", None) or DEFAULT_PORT
    if a.kind == "hostfile":
        hosts = a.hosts.split(",") if a.hosts else expand_nodelist(a.slurm_nodelist or "")
        sys.stdout.write(hostfile_text([h for h in hosts if h], a.slots))
        return 0
    if a.kind == "envfile":
        user = [os.path.expanduser("~/.deepspeed_env"), ".deepspeed_env", os.environ.get("DS_ENV_FILE", "")]
        sys.stdout.write(forwarded_env(extra_files=[f for f in dict.fromkeys(user) if f]))
        return 0
    if a.kind == "deepspeed":
        cmd = deepspeed_cmd(rest, gpus=a.gpus, hostfile=a.hostfile, master_addr=a.master_addr, master_port=port,
                            module=a.module, launcher=a.launcher)
    elif a.kind == "torchrun":
        cmd = torchrun_cmd(rest, nproc=a.nproc, nnodes=a.nnodes, master_addr=a.master_addr or "127.0.0.1",
                           master_port=port, module=a.module)
    elif a.kind == "mpirun":
        cmd = mpirun_cmd(rest, n=a.n, hosts=a.hosts.split(",") if a.hosts else None, module=a.module,
                         master_addr=a.master_addr, master_port=a.master_port)
    else:
        if not a.master_addr:
            p.error("srun-torchrun needs --master-addr (the first node of the allocation)")
        cmd = srun_torchrun_cmd(rest, nodes=a.nodes, gpus_per_node=a.gpus_per_node, master_addr=a.master_addr,
                                master_port=port, module=a.module)
    print(shlex.join(cmd) if a.kind != "srun-torchrun" else " ".join(cmd[:-1] + [shlex.quote(cmd[-1])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
