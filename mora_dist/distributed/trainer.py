"""The DeepSpeed trainer (ZeRO 0-3, any launcher): ``training.Trainer`` over the engine of ``engine.py``.

Mid-task checkpoints hold the gathered adapter and the active block's gathered optimizer state
(``mora_dist.run.portable``), so a task resumes on any world size; so does the adapter of every task boundary.
An optimizer step is ``training.train_step`` with the engine underneath (``DeepSpeedStep``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from mora_dist.distributed import engine as eng
from mora_dist.distributed import env
from mora_dist.distributed.collectives import all_gather_objects, mean_over_ranks
from mora_dist.io import atomic_write_json, read_json
from mora_dist.mora import trainable_parameters
from mora_dist.run import portable
from mora_dist.schedule import global_batch
from mora_dist.training import Trainer, answer_loss, train_step


class DeepSpeedStep:
    """``training.StepBackend`` over a DeepSpeed engine: it scales the loss by the accumulation, reduces the
    gradients, clips and schedules the learning rate itself; ``engine.step()`` after every micro-batch is
    DeepSpeed's contract (it steps the optimizer at the accumulation boundary only)."""

    def __init__(self, engine):
        self.engine = engine
        self.module = engine

    def forward_backward(self, batch: dict, n_micro: int) -> torch.Tensor:
        gas = self.engine.gradient_accumulation_steps()
        if n_micro != gas:
            raise ValueError(f"{n_micro} micro-batches per optimizer step, but gradient_accumulation_steps={gas}")
        batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        loss = answer_loss(self.engine, batch)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def optimizer_step(self, step: int) -> float | None:
        norm = self.engine.get_global_grad_norm()  # ZeRO 1-3 compute it at every step; None without ZeRO
        return None if norm is None else float(norm)

    def reduce_loss(self, losses: list[torch.Tensor]) -> float:
        acc = None
        for loss in losses:
            acc = loss.double() if acc is None else acc + loss.double()
        return float(mean_over_ranks((acc / len(losses)).reshape(1)))


def train_task(engine, batches: Iterable[dict], *,
               on_step: Callable[[int, float, int, float], None] | None = None) -> list[float]:
    """Train on this worker's micro-batches in order, one ``train_step`` per accumulation; returns every
    optimizer step's loss (the mean over micro-batches and workers, the same on every worker).

    Args:
        engine: from ``engine.build_engine``.
        batches: dicts with ``input_ids``, ``attention_mask``, ``labels``; a multiple of the engine's gradient
            accumulation steps, and the same number on every worker (ZeRO-3 deadlocks otherwise).
        on_step: ``on_step(step, loss, tokens, seconds)`` after each optimizer step (rank 0 logs).
    """
    batches = list(batches)
    gas = engine.gradient_accumulation_steps()
    if len(batches) % gas:
        raise ValueError(f"{len(batches)} micro-batches is not a multiple of gradient_accumulation_steps={gas}")
    backend = DeepSpeedStep(engine)
    losses: list[float] = []
    for step, start in enumerate(range(0, len(batches), gas)):
        t0 = time.perf_counter()
        chunk = batches[start:start + gas]
        losses.append(train_step(backend, step, chunk)[0])
        if on_step is not None:
            on_step(step, losses[-1], sum(int(b["attention_mask"].sum()) for b in chunk), time.perf_counter() - t0)
    return losses


class DeepSpeedTrainer(Trainer):
    """Training under DeepSpeed (ZeRO 0-3) through ``mora_dist.distributed.engine``."""

    def __init__(self, model, cfg, ds_config_file: Path | None = None):
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
            self.inference_engine = eng.build_inference_engine(self.model, self.cfg)
        return self.inference_engine

    def _release_forward(self) -> None:
        """The inference engine's hooks must go before the bank changes shape."""
        if self.inference_engine is not None:
            self.model = eng.destroy_engine(self.inference_engine)
            self.inference_engine = None

    def begin(self, steps: int, lr: float) -> None:
        self._release_forward()
        self.engine = eng.build_engine(self.model, self.cfg, total_steps=steps, lr=lr)
        if self.ds_config_file is not None and env.is_main():
            atomic_write_json(self.ds_config_file, self.engine.mora_ds_config)

    def step(self, step: int, micro_batches: list[dict]) -> float:
        loss, self.last_grad_norm = train_step(DeepSpeedStep(self.engine), step, micro_batches)
        return loss

    def save_checkpoint(self, root: Path, step: int) -> Path:
        """``root/step-N``: gathered adapter and optimizer state (any world size resumes it), written by rank 0
        and renamed into place (a collective: every worker calls it)."""
        tmp = Path(root) / f".tmp-step-{step:06d}"
        if env.is_main():
            portable.checkpoint_tmp(root, step)
        env.barrier()
        self.save_adapter(tmp / "adapter")
        named = list(trainable_parameters(self.model))
        opt_step, moments, masters = 0, {n: {} for n, _ in named}, {}
        if self.engine is not None:
            opt_step, moments, masters = eng.gather_state(self.engine, named, eng.DTYPES[self.cfg.model.dtype])
        rngs = all_gather_objects(portable.worker_rng())  # (CPU, GPU or None) per worker
        final = Path(root) / f"step-{step:06d}"
        if env.is_main():
            cuda = [g for _, g in rngs if g is not None]
            portable.write_state(tmp, portable.PortableState(
                step, self.world_size, global_batch(self.cfg.train, self.world_size), opt_step, moments, masters,
                [c for c, _ in rngs], cuda if len(cuda) == len(rngs) else []))
            portable.commit_checkpoint(root, tmp, step)
        env.barrier()
        return final

    def load_checkpoint(self, root: Path) -> int:
        directory = portable.latest_checkpoint(root)
        if directory is None:
            raise FileNotFoundError(f"{root}: no checkpoint")
        self.load_adapter(Path(directory) / "adapter", trainable_last=True)
        return read_json(directory / "trainer_state.json")["step"]

    def restore_optimizer(self, root: Path) -> None:
        """Optimizer state, schedule position and RNG of the newest checkpoint, written on any world size."""
        directory = portable.latest_checkpoint(root)
        info = read_json(directory / "trainer_state.json")
        if not portable.is_portable(directory):  # DeepSpeed's sharded checkpoint of earlier versions
            if info["world_size"] != self.world_size:
                raise portable.ResumeError(
                    f"{directory}: a mid-task checkpoint of an earlier version, written by {info['world_size']} "
                    f"workers, resumes only on {info['world_size']}")
            self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False)
            return
        named = list(trainable_parameters(self.model))
        state = portable.read_state(directory, [n for n, _ in named], global_batch(self.cfg.train, self.world_size))
        eng.restore_state(self.engine, named, state, info["step"])
        state.restore_rng(self.rank, self.world_size)

    def end(self) -> None:
        if self.engine is not None:
            self.model = eng.destroy_engine(self.engine)
            self.engine = None

    def barrier(self) -> None:
        env.barrier()
