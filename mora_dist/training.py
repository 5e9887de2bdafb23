"""Training one task in one process (plain PyTorch AdamW on the active block).

The distributed engine (``mora_dist.distributed``) trains the same way under DeepSpeed; this loop is the
single-process path and the reference the distributed runs are compared with.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable, Iterator

import torch

from mora_dist.data.tokenize import collate
from mora_dist.mora import trainable_parameters


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """Example indices of each micro-batch: seeded reshuffles per epoch, ``steps`` batches in all."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(n_examples))
            rng.shuffle(perm)
            order += perm
        yield order[:batch_size]
        order = order[batch_size:]


def steps_for(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a task: ``max_steps`` if set, else ``ceil(epochs * n / batch)``."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * n_examples / batch_size))


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine to 0 or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_task_local(model, encoded: list[dict], pad_id: int, *, steps: int, lr: float, batch_size: int,
                     seed: int, weight_decay: float = 0.0, schedule: str = "cosine", warmup: int = 0,
                     grad_clip: float = 1.0, on_step: Callable[[int, float, int, float], None] | None = None
                     ) -> list[float]:
    """Train the active block of ``model`` on ``encoded`` examples for ``steps`` steps; return the losses.

    ``on_step(step, loss, tokens, seconds)`` is called after each step (progress bars, logs).
    """
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("nothing to train: add a block first (mora.add_block)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    torch.manual_seed(seed)
    model.train()
    losses = []
    for step, idx in enumerate(batch_order(len(encoded), batch_size, steps, seed)):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, schedule, warmup)
        batch = collate([encoded[i] for i in idx], pad_id)
        loss = model(**batch).loss
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if on_step is not None:
            on_step(step, losses[-1], int(batch["attention_mask"].sum()), time.perf_counter() - t0)
    model.eval()
    return losses


@torch.no_grad()
def mean_answer_loss(model, encoded: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean loss on answer tokens (held-out loss)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        mask = labels != -100
        tok_logp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total += float(-(tok_logp * mask).sum())
        count += int(mask.sum())
    return total / max(count, 1)
