"""How the orchestrator trains: in one process with PyTorch (``LocalTrainer``) or under DeepSpeed
(``DeepSpeedTrainer``, any ZeRO stage, any launcher). Both expose the same small interface, so the
orchestrator reads the same either way:

    grow(name, seed)                 new trainable block at the start of a task
    unfreeze_last()                  or: the last block trainable again (seq_lora)
    begin(steps, lr)                 optimizer (and engine) for one task
    step(micro_batches) -> loss      one optimizer step over this worker's micro-batches
    save_checkpoint(dir, step)       resumable mid-task state (collective)
    load_checkpoint(dir) -> step     restore it
    end()                            drop optimizer / engine
    prune(decision), freeze()        bank changes at the end of a task
    save_adapter(dir), load_adapter(dir, trainable_last)
    forward_model                    what statistics and evaluation call (the engine under ZeRO-3)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from mora_dist.io import atomic_write_json, fsync_dir, read_json
from mora_dist.methods import extra_loss
from mora_dist.mora import add_block, freeze_blocks, load_adapter, save_adapter, trainable_parameters
from mora_dist.mora.inject import unfreeze_last_block
from mora_dist.run import portable
from mora_dist.training import lr_factor


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


class LocalTrainer:
    """One process, plain PyTorch AdamW over the active block. Checkpoints are bit-exact to resume."""

    rank, world_size = 0, 1

    def __init__(self, model, cfg):
        self.model = model
        self.cfg = cfg
        self.opt = None
        self.steps = 0
        self.lr = cfg.train.lr

    @property
    def forward_model(self):
        return self.model

    def grow(self, name: str, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            add_block(self.model, name)

    def unfreeze_last(self) -> None:
        """Make the last block trainable again instead of growing one (seq_lora)."""
        unfreeze_last_block(self.model)

    def begin(self, steps: int, lr: float) -> None:
        self.steps, self.lr = steps, lr
        params = [p for _, p in trainable_parameters(self.model)]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.train.weight_decay)

    def step(self, step: int, micro_batches: list[dict]) -> float:
        t = self.cfg.train
        for group in self.opt.param_groups:
            group["lr"] = self.lr * lr_factor(step, self.steps, t.schedule, t.warmup_steps)
        self.model.train()
        total = 0.0
        for batch in micro_batches:
            loss = self.model(**batch).loss / len(micro_batches)
            loss.backward()
            total += loss.detach().item()
        penalty = extra_loss(self.model, self.cfg)  # a method's regulariser (O-LoRA), once per step
        if penalty is not None:
            penalty.backward()
        # the norm before clipping, for the training curves (an infinite bound leaves the gradients as they are)
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(
            [p for g in self.opt.param_groups for p in g["params"]], t.grad_clip or float("inf")))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.eval()
        return total

    def save_checkpoint(self, root: Path, step: int) -> Path:
        """``root/step-N``: adapter (with the active block), optimizer and RNG state in the world-size independent
        form of ``mora_dist.run.portable`` (bit-exact to resume here, loadable by any number of workers); written
        to a temporary folder and renamed, so a checkpoint is complete or absent."""
        tmp = checkpoint_tmp(root, step)
        save_adapter(self.model, tmp / "adapter")
        portable.write_state(tmp, portable.local_state(self.opt, list(trainable_parameters(self.model)), step=step,
                                                       global_batch_now=portable.global_batch(self.cfg, 1)))
        return commit_checkpoint(root, tmp, step)

    def load_checkpoint(self, root: Path) -> int:
        """Load the newest checkpoint's adapter; returns its step."""
        directory = latest_checkpoint(root)
        if directory is None:
            raise FileNotFoundError(f"{root}: no checkpoint")
        load_adapter(self.model, directory / "adapter", trainable_last=True)
        return read_json(directory / "trainer_state.json")["step"]

    def restore_optimizer(self, root: Path) -> None:
        """Optimizer and RNG state of the newest checkpoint, written by this trainer or by any number of workers."""
        directory = latest_checkpoint(root)
        if portable.is_portable(directory):
            named = list(trainable_parameters(self.model))
            state = portable.read_state(directory, [n for n, _ in named], portable.global_batch(self.cfg, 1))
            portable.load_local(self.opt, named, state)
            return
        info = read_json(directory / "trainer_state.json")  # the earlier one-process format
        flat = load_file(str(directory / "trainer_state.safetensors"))
        torch.set_rng_state(flat.pop("torch_rng_state"))
        self.opt.load_state_dict(_unflatten_optimizer(flat, info["optimizer"]))

    def end(self) -> None:
        self.opt = None

    def prune(self, decision: dict) -> None:
        from mora_dist.mora.pruning import apply_pruning

        apply_pruning(self.model, decision)

    def freeze(self) -> None:
        freeze_blocks(self.model)

    def save_adapter(self, directory: Path) -> None:
        save_adapter(self.model, directory)

    def load_adapter(self, directory: Path, trainable_last: bool = False) -> None:
        load_adapter(self.model, directory, trainable_last=trainable_last)

    def barrier(self) -> None:
        pass


def _unflatten_optimizer(flat: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: (flat[f"state.{pid}.{k}"] if v == "tensor" else v) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


class DeepSpeedTrainer:
    """Training under DeepSpeed (ZeRO 0-3) through ``mora_dist.distributed.engine`` (and ``engine_state``).

    Mid-task checkpoints hold the gathered adapter and the active block's gathered optimizer state
    (``mora_dist.run.portable``), so a task resumes on any world size; so does the adapter of every task boundary.
    """

    def __init__(self, model, cfg, ds_config_file: Path | None = None):
        from mora_dist.distributed import env

        self.env = env
        self.model = model
        self.cfg = cfg
        self.engine = None
        self.inference_engine = None
        self.ds_config_file = ds_config_file
        self.rank, self.world_size = env.rank(), env.world_size()

    @property
    def zero3(self) -> bool:
        return self.cfg.distributed.zero_stage == 3

    @property
    def forward_model(self):
        """What forwards (statistics, evaluation) go through: under ZeRO-3 an engine that gathers parameters."""
        if self.engine is not None:
            return self.engine
        if not self.zero3:
            return self.model
        if self.inference_engine is None:
            from mora_dist.distributed import engine as eng

            self.inference_engine = eng.build_inference_engine(self.model, self.cfg)
        return self.inference_engine

    def _drop_inference_engine(self) -> None:
        if self.inference_engine is not None:
            from mora_dist.distributed import engine as eng

            self.model = eng.destroy_engine(self.inference_engine)
            self.inference_engine = None

    def grow(self, name: str, seed: int) -> None:
        from mora_dist.distributed import engine as eng

        self._drop_inference_engine()
        eng.grow(self.model, name, seed=seed)

    def unfreeze_last(self) -> None:
        from mora_dist.distributed import engine as eng

        self._drop_inference_engine()
        eng.unfreeze_last(self.model)

    def begin(self, steps: int, lr: float) -> None:
        from mora_dist.distributed import engine as eng

        self._drop_inference_engine()
        self.engine = eng.build_engine(self.model, self.cfg, total_steps=steps, lr=lr)
        if self.ds_config_file is not None and self.env.is_main():
            atomic_write_json(self.ds_config_file, self.engine.mora_ds_config)

    def step(self, step: int, micro_batches: list[dict]) -> float:
        from mora_dist.distributed import engine as eng

        loss = eng.train_task(self.engine, micro_batches)[0]
        norm = self.engine.get_global_grad_norm()  # ZeRO 1-3 compute it at every step; None without ZeRO
        self.last_grad_norm = None if norm is None else float(norm)
        return loss

    def save_checkpoint(self, root: Path, step: int) -> Path:
        """``root/step-N``: gathered adapter and optimizer state (any world size resumes it), written by rank 0
        and renamed into place (a collective: every worker calls it)."""
        from mora_dist.distributed import engine as eng

        tmp = Path(root) / f".tmp-step-{step:06d}"
        if self.env.is_main():
            checkpoint_tmp(root, step)
        self.env.barrier()
        eng.save_adapter_distributed(self.model, tmp / "adapter")
        named = list(trainable_parameters(self.model))
        opt_step, moments, masters = 0, {n: {} for n, _ in named}, {}
        if self.engine is not None:
            from mora_dist.distributed import engine_state

            opt_step, moments, masters = engine_state.gather_state(self.engine, named, eng.DTYPES[self.cfg.model.dtype])
        rng = _all_gather_rng(self.world_size)
        final = Path(root) / f"step-{step:06d}"
        if self.env.is_main():
            portable.write_state(tmp, portable.PortableState(
                step, self.world_size, portable.global_batch(self.cfg, self.world_size), opt_step, moments, masters,
                rng))
            commit_checkpoint(root, tmp, step)
        self.env.barrier()
        return final

    def load_checkpoint(self, root: Path) -> int:
        from mora_dist.distributed import engine as eng

        directory = latest_checkpoint(root)
        if directory is None:
            raise FileNotFoundError(f"{root}: no checkpoint")
        self._drop_inference_engine()
        eng.load_adapter_distributed(self.model, Path(directory) / "adapter", trainable_last=True)
        return read_json(directory / "trainer_state.json")["step"]

    def restore_optimizer(self, root: Path) -> None:
        """Optimizer state, schedule position and RNG of the newest checkpoint, written on any world size."""
        directory = latest_checkpoint(root)
        info = read_json(directory / "trainer_state.json")
        if not portable.is_portable(directory):  # DeepSpeed's sharded checkpoint of earlier versions
            if info["world_size"] != self.world_size:
                raise portable.ResumeError(
                    f"{directory}: a mid-task checkpoint of an earlier version, written by {info['world_size']} "
                    f"workers, resumes only on {info['world_size']}")
            self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False)
            return
        from mora_dist.distributed import engine_state

        named = list(trainable_parameters(self.model))
        state = portable.read_state(directory, [n for n, _ in named], portable.global_batch(self.cfg, self.world_size))
        engine_state.restore_state(self.engine, named, state, info["step"])
        torch.set_rng_state(state.rng_state(self.rank, self.world_size))

    def end(self) -> None:
        from mora_dist.distributed import engine as eng

        if self.engine is not None:
            self.model = eng.destroy_engine(self.engine)
            self.engine = None

    def prune(self, decision: dict) -> None:
        from mora_dist.distributed import engine as eng

        self._drop_inference_engine()
        eng.prune(self.model, decision)

    def freeze(self) -> None:
        from mora_dist.distributed import engine as eng

        self._drop_inference_engine()
        eng.freeze(self.model)

    def save_adapter(self, directory: Path) -> None:
        from mora_dist.distributed import engine as eng

        eng.save_adapter_distributed(self.model, directory)

    def load_adapter(self, directory: Path, trainable_last: bool = False) -> None:
        from mora_dist.distributed import engine as eng

        self._drop_inference_engine()
        eng.load_adapter_distributed(self.model, directory, trainable_last=trainable_last)

    def barrier(self) -> None:
        self.env.barrier()


def _all_gather_rng(world_size: int) -> list[torch.Tensor]:
    """Every worker's torch RNG state, in rank order (on every worker)."""
    state = torch.get_rng_state()
    if world_size == 1:
        return [state]
    import torch.distributed as dist

    states: list = [None] * world_size
    dist.all_gather_object(states, state)
    return states
