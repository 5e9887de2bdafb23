"""The one training step and the trainer interface.

``train_step`` is the only implementation of an optimizer step in the package: the one-process trainer
(``run/trainer.py``), the DeepSpeed trainer (``distributed/trainer.py``), the demo (``train_task_local``) and the
distributed self-test all call it. What differs underneath is a ``StepBackend``: ``TorchStep`` (plain PyTorch
AdamW over the active block) or the DeepSpeed engine's (``distributed/trainer.py``: the engine scales, clips,
schedules and reduces gradients itself).

``Trainer`` declares what the orchestrator asks of a trainer; both trainers implement it, and its bank changes
(grow, freeze, prune, load) are shared: they go through ``distributed.bank``, whose gathering is a no-op off ZeRO-3.
"""

from __future__ import annotations

import abc
import time
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from mora_dist.base_model import takes_logits_to_keep
from mora_dist.data.grouping import batch_order
from mora_dist.data.tokenize import IGNORE, collate
from mora_dist.device import model_device, to_device
from mora_dist.distributed import bank
from mora_dist.mora import trainable_parameters
from mora_dist.schedule import lr_factor


@runtime_checkable
class StepBackend(Protocol):
    """What runs under ``train_step``: the forward module, its backward, the optimizer step, the loss report."""

    module: nn.Module

    def forward_backward(self, batch: dict, n_micro: int) -> torch.Tensor:
        """Forward one micro-batch and backpropagate its share of the step's loss; returns the loss (detached)."""

    def optimizer_step(self, step: int) -> float | None:
        """Apply the accumulated gradients at optimizer step ``step`` (0-based); returns the gradient norm before
        clipping where known."""

    def reduce_loss(self, losses: list[torch.Tensor]) -> float:
        """The step's loss from what ``forward_backward`` returned (over every worker)."""


def answer_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a training batch (``labels`` is ``-100`` elsewhere).

    The same value as the model's own ``labels`` loss, but the vocabulary projection runs only at the positions
    that predict an answer token of some row (``logits_to_keep``), not at every position: with short answers after
    long prompts that projection (the largest matrix of a small model) was a fifth of the forward's work and its
    largest activation. Models whose forward has no ``logits_to_keep`` get the ordinary ``labels`` loss.
    """
    if not takes_logits_to_keep(model):  # a DeepSpeed engine forwards keyword arguments to its module
        return model(**batch).loss
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    logits = out.logits.float()  # (rows, kept positions, vocabulary), upcast as the model's own loss does
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE)


def train_step(backend: StepBackend, step: int, micro_batches: list[dict]) -> tuple[float, float | None]:
    """One optimizer step over this worker's ``micro_batches``; returns ``(loss, grad_norm)``."""
    backend.module.train()
    losses = [backend.forward_backward(batch, len(micro_batches)) for batch in micro_batches]
    grad_norm = backend.optimizer_step(step)
    backend.module.eval()
    return backend.reduce_loss(losses), grad_norm


class TorchStep:
    """One process, plain PyTorch: AdamW over ``params``, the schedule of ``mora_dist.schedule``, clipping.

    Args:
        penalty: a method's regulariser (O-LoRA), added once per optimizer step before clipping.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor], *, lr: float, steps: int,
                 weight_decay: float = 0.0, schedule: str = "cosine", warmup: int = 0, grad_clip: float | None = 1.0,
                 penalty: Callable[[], torch.Tensor | None] | None = None):
        if not params:
            raise ValueError("nothing to train: add a block first (mora.add_block)")
        self.module = model
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.lr, self.steps, self.schedule, self.warmup = lr, steps, schedule, warmup
        self.grad_clip, self.penalty = grad_clip, penalty

    def forward_backward(self, batch: dict, n_micro: int) -> torch.Tensor:
        loss = answer_loss(self.module, to_device(batch, model_device(self.module))) / n_micro
        loss.backward()
        return loss.detach()

    def optimizer_step(self, step: int) -> float:
        extra = self.penalty() if self.penalty is not None else None
        if extra is not None:
            extra.backward()
        for group in self.opt.param_groups:
            group["lr"] = self.lr * lr_factor(step, self.steps, self.schedule, self.warmup)
        # an infinite bound leaves the gradients as they are and still gives the norm (training curves)
        norm = float(torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                                    self.grad_clip or float("inf")))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    def reduce_loss(self, losses: list[torch.Tensor]) -> float:
        total = 0.0
        for loss in losses:  # the micro-batch losses are already divided by their number
            total += loss.item()
        return total


class Trainer(abc.ABC):
    """What the orchestrator asks of a trainer, in one process or under DeepSpeed.

    A task goes: ``grow`` (or ``unfreeze_last``) → ``begin`` → ``step`` ... with ``save_checkpoint`` now and
    then (``load_checkpoint`` + ``restore_optimizer`` to resume) → ``end``; then ``prune``, ``freeze``,
    ``save_adapter``. Statistics and evaluation forward through ``forward_model``. The bank changes are shared
    (``distributed.bank``); a trainer whose forward module must be rebuilt after them overrides
    ``_release_forward``. Every method is a collective under DeepSpeed: all workers call it.
    """

    model: nn.Module
    cfg: object
    rank: int = 0
    world_size: int = 1
    last_grad_norm: float | None = None

    @property
    @abc.abstractmethod
    def forward_model(self) -> nn.Module:
        """What forwards (statistics, evaluation) go through (under ZeRO-3 an engine that gathers parameters)."""

    @abc.abstractmethod
    def begin(self, steps: int, lr: float) -> None:
        """A fresh optimizer (and engine) over the active block for a task of ``steps`` steps."""

    @abc.abstractmethod
    def step(self, step: int, micro_batches: list[dict]) -> float:
        """Optimizer step ``step`` (0-based) over this worker's micro-batches; returns the loss, sets
        ``last_grad_norm``."""

    @abc.abstractmethod
    def save_checkpoint(self, root: Path, step: int) -> Path:
        """Resumable mid-task state in ``root/step-N`` (adapter, optimizer, RNG)."""

    @abc.abstractmethod
    def load_checkpoint(self, root: Path) -> int:
        """Load the newest checkpoint's adapter; returns its step."""

    @abc.abstractmethod
    def restore_optimizer(self, root: Path) -> None:
        """Optimizer, schedule position and RNG of the newest checkpoint (after ``begin``)."""

    @abc.abstractmethod
    def end(self) -> None:
        """Drop the optimizer (and engine) at the end of a task."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait for every worker."""

    def _release_forward(self) -> None:
        """Called before the bank changes (nothing to do in one process)."""

    def grow(self, name: str, seed: int) -> None:
        """A new trainable block at the start of a task (seeded: the same on every worker)."""
        self._release_forward()
        bank.grow(self.model, name, seed=seed)

    def unfreeze_last(self) -> None:
        """The last block trainable again instead of a new one (seq_lora)."""
        self._release_forward()
        bank.unfreeze_last(self.model)

    def prune(self, decision: dict) -> None:
        """Remove the experts a pruning decision names."""
        self._release_forward()
        bank.prune(self.model, decision)

    def freeze(self) -> None:
        """Move the active block into the frozen bank."""
        self._release_forward()
        bank.freeze(self.model)

    def save_adapter(self, directory: Path) -> None:
        """Write the adapter (gathered; rank 0 writes)."""
        bank.save_adapter(self.model, directory)

    def load_adapter(self, directory: Path, trainable_last: bool = False) -> None:
        """Load an adapter written at any world size."""
        self._release_forward()
        bank.load_adapter(self.model, directory, trainable_last=trainable_last)


def train_task_local(model, encoded: list[dict], pad_id: int, *, steps: int, lr: float, batch_size: int,
                     seed: int, weight_decay: float = 0.0, schedule: str = "cosine", warmup: int = 0,
                     grad_clip: float = 1.0, on_step: Callable[[int, float, int, float], None] | None = None
                     ) -> list[float]:
    """Train the active block of ``model`` on ``encoded`` examples for ``steps`` steps in one process (one
    micro-batch of ``batch_size`` per step, seeded reshuffles); return the losses.

    ``on_step(step, loss, tokens, seconds)`` is called after each step (progress bars, logs).
    """
    backend = TorchStep(model, [p for _, p in trainable_parameters(model)], lr=lr, steps=steps,
                        weight_decay=weight_decay, schedule=schedule, warmup=warmup, grad_clip=grad_clip)
    torch.manual_seed(seed)
    losses = []
    for step, idx in enumerate(batch_order(len(encoded), batch_size, steps, seed)):
        t0 = time.perf_counter()
        batch = collate([encoded[i] for i in idx], pad_id)
        losses.append(train_step(backend, step, [batch])[0])
        if on_step is not None:
            on_step(step, losses[-1], int(batch["attention_mask"].sum()), time.perf_counter() - t0)
    return losses


@torch.no_grad()
def mean_answer_loss(model, encoded: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean loss on answer tokens (held-out loss)."""
    model.eval()
    total, count = 0.0, 0
    device = model_device(model)
    for start in range(0, len(encoded), batch_size):
        batch = to_device(collate(encoded[start:start + batch_size], pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        mask = labels != -100
        tok_logp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total += float(-(tok_logp * mask).sum())
        count += int(mask.sum())
    return total / max(count, 1)
