"""Mid-task training state in a form that does not depend on the number of workers.

A mid-task checkpoint ``ckpt/NN-TASK/step-N/`` holds the gathered adapter (``adapter/``) and, beside it:

* ``trainer_state.json``: ``format`` (2), ``step`` (optimizer steps done), ``world_size`` and ``global_batch`` of
  the run that wrote it, ``opt_step`` (AdamW's step count) and the names of the active block's parameters;
* ``trainer_state.safetensors``: per parameter name, AdamW's full (gathered) ``exp_avg`` and ``exp_avg_sq``
  (``optim/NAME/exp_avg`` ...), the fp32 master copy where the model trains in 16 bits (``master/NAME``), and
  every worker's torch RNG state (``rng/RANK``) and, on GPUs, its GPU's (``cuda_rng/RANK``: dropout masks of
  tensors on the GPU are drawn from it).

The trainable set is only the active adapter block, so gathering it whole is cheap, and the same files load
into the one-process trainer (plain AdamW) and into DeepSpeed under any ZeRO stage and any world size
(``mora_dist.distributed.engine``). On the world size that wrote it, every worker gets its own RNG state
back and the resume is bit-exact; on another one, each worker's RNG is seeded from the saved states and its
rank (dropout masks depend on the worker count anyway). The data plan must not change: the global batch of
the checkpoint has to be this run's (set ``train.global_batch_size`` to make it independent of the workers). A
GPU worker resuming a checkpoint without GPU states (written on CPUs) seeds its GPU's generator from its CPU state.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mora_dist.device import compute_device
from mora_dist.io import atomic_write_json, fsync_dir, read_json

FORMAT = 2
MOMENTS = ("exp_avg", "exp_avg_sq")


class ResumeError(RuntimeError):
    """A mid-task checkpoint that this run cannot continue; the message says why and what to do."""


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint ``root/step-NNNNNN`` (complete ones only: they appear by a rename)."""
    steps = sorted(Path(root).glob("step-*")) if Path(root).is_dir() else []
    return steps[-1] if steps else None


def checkpoint_tmp(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step`` (any leftover of a crashed write is removed)."""
    tmp = Path(root) / f".tmp-step-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(root: Path, tmp: Path, step: int) -> Path:
    """Move a fully written checkpoint into place, then drop the older ones."""
    final = Path(root) / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in Path(root).glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class PortableState:
    """What a mid-task checkpoint holds besides the adapter (see the module docstring)."""

    step: int
    world_size: int
    global_batch: int
    opt_step: int
    moments: dict[str, dict[str, torch.Tensor]]
    masters: dict[str, torch.Tensor]
    rng: list[torch.Tensor]
    cuda_rng: list[torch.Tensor] = ()  # every worker's GPU generator; empty when written on CPUs

    def rng_state(self, rank: int, world_size: int) -> torch.Tensor:
        """The RNG state worker ``rank`` of ``world_size`` continues with."""
        if world_size == self.world_size:
            return self.rng[rank]
        digest = hashlib.sha256(b"".join(bytes(s.numpy()) for s in self.rng) + rank.to_bytes(4, "little"))
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(int.from_bytes(digest.digest()[:8], "little"))
            return torch.get_rng_state()

    def restore_rng(self, rank: int, world_size: int) -> None:
        """Give worker ``rank`` of ``world_size`` its generators back: the CPU's, and its GPU's when it has one
        (the saved one on the same world size, else seeded from the CPU state it continues with)."""
        cpu = self.rng_state(rank, world_size)
        torch.set_rng_state(cpu)
        if not torch.cuda.is_available():
            return
        device = compute_device()
        if world_size == self.world_size and len(self.cuda_rng) == world_size:
            torch.cuda.set_rng_state(self.cuda_rng[rank], device)
        else:
            seed = int.from_bytes(hashlib.sha256(bytes(cpu.numpy())).digest()[:8], "little")
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)


def worker_rng() -> tuple[torch.Tensor, torch.Tensor | None]:
    """This worker's CPU generator state and its GPU's (``None`` without one; dropout masks of tensors on the
    GPU are drawn from it), for ``PortableState``."""
    gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), torch.cuda.get_rng_state(compute_device()) if gpu else None


def write_state(directory: Path, state: PortableState) -> None:
    """Write ``state`` into a checkpoint folder (one writer: rank 0)."""
    tensors = {f"optim/{name}/{key}": v.detach().to("cpu", torch.float32).contiguous()
               for name, moments in state.moments.items() for key, v in moments.items()}
    tensors.update({f"master/{name}": v.detach().to("cpu", torch.float32).contiguous()
                    for name, v in state.masters.items()})
    tensors.update({f"rng/{r}": s.clone() for r, s in enumerate(state.rng)})  # distinct storages
    tensors.update({f"cuda_rng/{r}": s.cpu().clone() for r, s in enumerate(state.cuda_rng)})
    save_file(tensors, str(Path(directory) / "trainer_state.safetensors"))
    atomic_write_json(Path(directory) / "trainer_state.json", {
        "format": FORMAT, "step": state.step, "world_size": state.world_size, "global_batch": state.global_batch,
        "opt_step": state.opt_step, "params": list(state.moments)})


def is_portable(directory: Path) -> bool:
    return read_json(Path(directory) / "trainer_state.json").get("format") == FORMAT


def read_state(directory: Path, params: list[str], global_batch_now: int) -> PortableState:
    """The state saved in ``directory``, checked against this run.

    Raises:
        ResumeError: the checkpoint trains other parameters, or another global batch (its data plan differs).
    """
    directory = Path(directory)
    info = read_json(directory / "trainer_state.json")
    if info["global_batch"] != global_batch_now:
        raise ResumeError(
            f"{directory}: this mid-task checkpoint was written with a global batch of {info['global_batch']} "
            f"examples ({info['world_size']} workers) but this run's is {global_batch_now}, so its steps and data "
            f"order differ. Resume this task with {info['world_size']} workers, or start runs with "
            "train.global_batch_size set: then any number of workers continues a checkpoint")
    if sorted(info["params"]) != sorted(params):
        missing = sorted(set(params) ^ set(info["params"]))[:3]
        raise ResumeError(f"{directory}: the checkpoint's trainable parameters differ from the model's "
                          f"({missing} ...); it belongs to another model or adapter layout")
    flat = load_file(str(directory / "trainer_state.safetensors"))
    moments = {n: {k: flat[f"optim/{n}/{k}"] for k in MOMENTS if f"optim/{n}/{k}" in flat} for n in info["params"]}
    masters = {n: flat[f"master/{n}"] for n in info["params"] if f"master/{n}" in flat}
    rng = [flat[f"rng/{r}"] for r in range(info["world_size"])]
    cuda_rng = [flat[f"cuda_rng/{r}"] for r in range(info["world_size"]) if f"cuda_rng/{r}" in flat]
    return PortableState(info["step"], info["world_size"], info["global_batch"], info["opt_step"], moments,
                         masters, rng, cuda_rng)


# ------------------------------------------------------------------------------------ one process (AdamW)
def local_state(opt: torch.optim.Optimizer | None, named_params: list[tuple[str, torch.Tensor]], *, step: int,
                global_batch_now: int) -> PortableState:
    """The state of the one-process trainer's AdamW (moments by parameter name; none before the first step or
    without an optimizer, as at the start of a task)."""
    moments, opt_step = {}, 0
    for name, p in named_params:
        st = opt.state.get(p, {}) if opt is not None else {}
        if st:
            moments[name] = {k: st[k] for k in MOMENTS}
            opt_step = int(st["step"])
        else:
            moments[name] = {}
    cpu, cuda = worker_rng()
    return PortableState(step, 1, global_batch_now, opt_step, moments, {}, [cpu], [cuda] if cuda is not None else [])


def load_local(opt: torch.optim.Optimizer, named_params: list[tuple[str, torch.Tensor]], state: PortableState) -> None:
    """Give the one-process trainer's AdamW (just built, no state yet) the saved state, and restore the RNG."""
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    for name, p in named_params:
        m = state.moments[name]
        if m:
            sd["state"][index[id(p)]] = {"step": torch.tensor(float(state.opt_step)),
                                         **{k: m[k].to(p.device).reshape(p.shape).clone() for k in MOMENTS}}
        if name in state.masters and p.dtype != torch.float32:
            with torch.no_grad():
                p.copy_(state.masters[name].reshape(p.shape))
    opt.load_state_dict(sd)
    state.restore_rng(0, 1)
