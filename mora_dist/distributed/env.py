"""Who am I in the job: rank discovery for the deepspeed launcher, torchrun, mpirun/mpiexec and single processes.

``init_distributed`` reads the launcher's environment, checks it for consistency *before* any training starts
(every error names the variable and the fix), fills in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` where an MPI launcher left them out, and initialises ``torch.distributed``. MPI ranks come from
mpi4py, never from DeepSpeed's MPI discovery, which overwrites ``MASTER_ADDR`` with a non-loopback address
(docs/design.md, Distribution). A ``MASTER_ADDR`` already set is always respected.

Every multi-process program must end with ``shutdown()``: with gloo, a process that exits without destroying its
process group aborts in about half of runs (docs/design.md, Distribution). Its entry point then returns through
``finish(code)``, which leaves a launched worker without the interpreter's teardown (see there).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping

import torch
import torch.distributed as dist

# Variables the MPI launchers set: Open MPI, MPICH/Hydra (also Intel MPI), MVAPICH, PMIx.
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")


class DistributedEnvError(RuntimeError):
    """An inconsistent launcher environment; the message names the variable and the fix."""


@dataclass(frozen=True)
class DistEnv:
    """The resolved place of this process in the job.

    Attributes:
        rank, world_size, local_rank: as torch.distributed uses them.
        master_addr, master_port: the rendezvous (``None`` for a single process).
        launcher: ``"env"`` (torchrun / deepspeed launcher / Slurm+torchrun), ``"mpi"`` or ``"single"``.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    launcher: str

    def env_vars(self) -> dict[str, str]:
        """The variables ``torch.distributed``'s ``env://`` rendezvous reads."""
        out = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank)}
        if self.master_addr is not None:
            out["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            out["MASTER_PORT"] = str(self.master_port)
        return out


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise DistributedEnvError(f"{name}={raw!r} is not an integer; unset it or let the launcher set it") from None


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in env), None)


def _port(env: Mapping[str, str]) -> int:
    port = _int_var(env, "MASTER_PORT")
    if not 0 < port < 65536:
        raise DistributedEnvError(f"MASTER_PORT={port} is not a TCP port; choose one in 1024-65535")
    return port


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (for local jobs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MPIInfo:
    """What mpi4py says about the job: rank, size, local rank, and whether all ranks share one host."""

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as err:  # pragma: no cover - depends on the machine
            raise DistributedEnvError(
                "this process was started by an MPI launcher (PMI_RANK/OMPI_COMM_WORLD_RANK is set) but mpi4py "
                "is not installed; pip install 'mora-dist[mpi]' or launch with torchrun/deepspeed") from err
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        self.hostnames = self.comm.allgather(socket.gethostname())

    def bcast(self, value):
        return self.comm.bcast(value, root=0)


def discover(env: Mapping[str, str] | None = None, mpi: Callable[[], MPIInfo] = MPIInfo) -> DistEnv:
    """Resolve rank, world size and rendezvous from the environment, checking it for consistency.

    Args:
        env: the environment (default ``os.environ``); not modified.
        mpi: factory of the mpi4py view, called only under an MPI launcher (tests pass a fake).

    Raises:
        DistributedEnvError: inconsistent or incomplete variables, naming the variable and the fix.
    """
    env = os.environ if env is None else env
    mpi_size_var = _first(env, MPI_SIZE_VARS)
    if mpi_size_var is not None:
        return _discover_mpi(env, mpi_size_var, mpi)
    has_rank, has_world = "RANK" in env, "WORLD_SIZE" in env
    if not has_rank and not has_world:
        srun_tasks = env.get("SLURM_STEP_NUM_TASKS", "1")
        if srun_tasks.isdigit() and int(srun_tasks) > 1:
            raise DistributedEnvError(
                f"started by srun as one of SLURM_STEP_NUM_TASKS={srun_tasks} tasks, but no launcher set RANK/"
                "WORLD_SIZE: every task would train alone. Use launch/slurm.sbatch (the deepspeed launcher or "
                "srun + torchrun, one task per node) or an MPI build of srun (--mpi=pmi2)")
        return DistEnv(0, 1, 0, None, None, "single")
    if has_rank and not has_world:
        raise DistributedEnvError(
            f"RANK={env['RANK']} is set but WORLD_SIZE is not; export WORLD_SIZE (the number of processes) or "
            "launch with torchrun / the deepspeed launcher, which set both")
    world = _int_var(env, "WORLD_SIZE")
    if world < 1:
        raise DistributedEnvError(f"WORLD_SIZE={world} must be >= 1")
    if not has_rank:
        if world == 1:
            return DistEnv(0, 1, 0, None, None, "single")
        raise DistributedEnvError(
            f"WORLD_SIZE={world} is set but RANK is not; export RANK for each process (0..{world - 1}) or launch "
            "with torchrun / the deepspeed launcher")
    rank = _int_var(env, "RANK")
    if not 0 <= rank < world:
        raise DistributedEnvError(
            f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world}); each process needs a distinct RANK "
            "below WORLD_SIZE")
    if "LOCAL_RANK" in env:
        local_rank = _int_var(env, "LOCAL_RANK")
    elif world == 1:
        local_rank = 0
    else:
        raise DistributedEnvError("RANK and WORLD_SIZE are set but LOCAL_RANK is not; export LOCAL_RANK (the "
                                  "process index on its node) or launch with torchrun / the deepspeed launcher")
    if not 0 <= local_rank <= rank:
        raise DistributedEnvError(f"LOCAL_RANK={local_rank} must be in 0..RANK ({rank})")
    if world == 1 and "MASTER_ADDR" not in env and "MASTER_PORT" not in env:
        return DistEnv(0, 1, 0, None, None, "single")
    if "MASTER_ADDR" not in env:
        raise DistributedEnvError(
            f"WORLD_SIZE={world} but MASTER_ADDR is not set; export MASTER_ADDR=<host of rank 0> "
            "(127.0.0.1 on one machine)")
    if "MASTER_PORT" not in env:
        raise DistributedEnvError(
            f"WORLD_SIZE={world} but MASTER_PORT is not set; export MASTER_PORT=<a free port, e.g. 29500> "
            "(the same on every process)")
    return DistEnv(rank, world, local_rank, env["MASTER_ADDR"], _port(env), "env")


def _discover_mpi(env: Mapping[str, str], size_var: str, mpi: Callable[[], MPIInfo]) -> DistEnv:
    info = mpi()
    env_size = _int_var(env, size_var)
    if env_size != info.size:
        raise DistributedEnvError(f"{size_var}={env_size} but mpi4py sees {info.size} processes; mpi4py is linked "
                                  "against another MPI than the launcher's: use the mpiexec of the same MPI")
    if "WORLD_SIZE" in env and _int_var(env, "WORLD_SIZE") != info.size:
        raise DistributedEnvError(
            f"WORLD_SIZE={env['WORLD_SIZE']} but the MPI launcher started {info.size} processes; unset WORLD_SIZE "
            f"or launch with mpiexec -n {env['WORLD_SIZE']}")
    if "RANK" in env and _int_var(env, "RANK") != info.rank:
        raise DistributedEnvError(
            f"RANK={env['RANK']} but this is MPI rank {info.rank}; unset RANK (the MPI launcher decides ranks)")
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif len(set(info.hostnames)) == 1:
        addr = "127.0.0.1"  # one machine: rendezvous on loopback, never on a public interface
    else:
        addr = info.hostnames[0]
    if "MASTER_PORT" in env:
        port = _port(env)
    else:
        port = info.bcast(free_port("127.0.0.1" if addr == "127.0.0.1" else "") if info.rank == 0 else None)
    return DistEnv(info.rank, info.size, info.local_rank, addr, port, "mpi")


def default_backend() -> str:
    """``nccl`` with CUDA, ``gloo`` otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Discover this process's place in the job and initialise ``torch.distributed`` when there are several.

    Fills ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` into ``os.environ`` for MPI
    launches (DeepSpeed reads them and then skips its own MPI discovery). A single process initialises nothing;
    ``build_engine`` gives it a private one-rank group when DeepSpeed needs one.

    Args:
        backend: torch.distributed backend; ``None`` picks nccl with CUDA and gloo otherwise.
        timeout_s: collective timeout.

    Returns:
        ``(rank, world_size, local_rank)``.

    Raises:
        DistributedEnvError: the environment is inconsistent (before any process group is formed).
    """
    if dist.is_available() and dist.is_initialized():
        return rank(), world_size(), int(os.environ.get("LOCAL_RANK", 0))
    info = discover()
    if info.launcher == "single":
        return 0, 1, 0
    os.environ.update(info.env_vars())
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=timedelta(seconds=timeout_s))
    global _joined_group
    _joined_group = True
    # one line per worker: where each rank landed (the first thing to check on a new cluster)
    print(f"[mora-dist] rank {info.rank}/{info.world_size} on {socket.gethostname()} ({info.launcher} launcher, "
          f"rendezvous {info.master_addr}:{info.master_port}, {backend})", file=sys.stderr, flush=True)
    return info.rank, info.world_size, info.local_rank


_joined_group = False  # this process joined a multi-process group (init_distributed under a launcher)


def ensure_process_group(backend: str | None = None) -> None:
    """Initialise a private one-rank group (an in-memory store, no port) if none exists; DeepSpeed needs one."""
    if dist.is_initialized():
        return
    init_distributed(backend)
    if not dist.is_initialized():
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # DeepSpeed reads these
            os.environ.setdefault(name, value)
        dist.init_process_group(backend=backend or default_backend(), store=dist.HashStore(), rank=0, world_size=1)


def rank() -> int:
    """This worker's rank (0 in one process)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of workers: the one place it is computed (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every worker (nothing to wait for in one process)."""
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """End a distributed program cleanly: barrier, garbage collection, destroy the process group.

    Without it gloo aborts at exit in about half of runs. Safe to call when nothing was initialised.
    """
    if dist.is_available() and dist.is_initialized():
        barrier()
        gc.collect()
        dist.destroy_process_group()
    else:
        gc.collect()


def finish(code: int) -> int:
    """The exit status of an entry point: returned in a single process; a launched worker leaves here with it.

    A worker that joined a multi-process group (``init_distributed`` under a launcher) flushes its output and
    logging, destroys the group if ``shutdown`` did not, finalises MPI if mpi4py started it, and ends with
    ``os._exit(code)``, skipping the interpreter's teardown. That teardown still aborted after a clean
    ``shutdown()`` ("terminate called without an active exception", SIGABRT: a native thread destroyed at exit)
    in a 2-rank ZeRO-3 run under mpiexec, turning finished work into a failed job for the launcher. Everything
    a run keeps is written (atomically) and closed before this point, so there is nothing left for it to do.
    """
    if not _joined_group:
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    logging.shutdown()
    if dist.is_available() and dist.is_initialized():  # an error path that left before shutdown()
        dist.destroy_process_group()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)
