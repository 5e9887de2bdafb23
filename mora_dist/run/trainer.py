"""The one-process trainer: plain PyTorch AdamW over the active block (``training.Trainer``, ``TorchStep``).

Its DeepSpeed counterpart, for any world size and ZeRO stage, is ``mora_dist.distributed.trainer``; both are
built by ``mora_dist.run.build``. Checkpoints are bit-exact to resume here and load onto any number of workers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mora_dist.io import read_json
from mora_dist.methods import extra_loss
from mora_dist.mora import trainable_parameters
from mora_dist.run import portable
from mora_dist.schedule import global_batch
from mora_dist.training import TorchStep, Trainer, train_step


class LocalTrainer(Trainer):
    """One process, plain PyTorch AdamW over the active block. Checkpoints are bit-exact to resume."""

    def __init__(self, model, cfg):
        self.model = model
        self.cfg = cfg
        self.backend: TorchStep | None = None

    @property
    def forward_model(self):
        return self.model

    @property
    def opt(self) -> torch.optim.Optimizer | None:
        return self.backend.opt if self.backend is not None else None

    def begin(self, steps: int, lr: float) -> None:
        t = self.cfg.train
        self.backend = TorchStep(self.model, [p for _, p in trainable_parameters(self.model)], lr=lr, steps=steps,
                                 weight_decay=t.weight_decay, schedule=t.schedule, warmup=t.warmup_steps,
                                 grad_clip=t.grad_clip, penalty=lambda: extra_loss(self.model, self.cfg))

    def step(self, step: int, micro_batches: list[dict]) -> float:
        loss, self.last_grad_norm = train_step(self.backend, step, micro_batches)
        return loss

    def save_checkpoint(self, root: Path, step: int) -> Path:
        """``root/step-N``: adapter (with the active block), optimizer and RNG state in the world-size independent
        form of ``mora_dist.run.portable`` (bit-exact to resume here, loadable by any number of workers); written
        to a temporary folder and renamed, so a checkpoint is complete or absent."""
        tmp = portable.checkpoint_tmp(root, step)
        self.save_adapter(tmp / "adapter")
        portable.write_state(tmp, portable.local_state(self.opt, list(trainable_parameters(self.model)), step=step,
                                                       global_batch_now=global_batch(self.cfg.train, 1)))
        return portable.commit_checkpoint(root, tmp, step)

    def load_checkpoint(self, root: Path) -> int:
        """Load the newest checkpoint's adapter; returns its step."""
        directory = portable.latest_checkpoint(root)
        if directory is None:
            raise FileNotFoundError(f"{root}: no checkpoint")
        self.load_adapter(directory / "adapter", trainable_last=True)
        return read_json(directory / "trainer_state.json")["step"]

    def restore_optimizer(self, root: Path) -> None:
        """Optimizer and RNG state of the newest checkpoint, written by this trainer or by any number of workers."""
        directory = portable.latest_checkpoint(root)
        if portable.is_portable(directory):
            named = list(trainable_parameters(self.model))
            state = portable.read_state(directory, [n for n, _ in named], global_batch(self.cfg.train, 1))
            portable.load_local(self.opt, named, state)
            return
        info = read_json(directory / "trainer_state.json")  # the earlier one-process format
        flat = load_file(str(directory / "trainer_state.safetensors"))
        torch.set_rng_state(flat.pop("torch_rng_state"))
        self.opt.load_state_dict(_unflatten_optimizer(flat, info["optimizer"]))

    def end(self) -> None:
        self.backend = None

    def barrier(self) -> None:
        pass


def _unflatten_optimizer(flat: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: (flat[f"state.{pid}.{k}"] if v == "tensor" else v) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}
