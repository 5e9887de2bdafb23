"""Continual-learning methods as settings of one rank bank and one orchestrator (``RunConfig.method``).

| method     | bank per task                                  | gate                                  | extra loss  |
| ---------- | ---------------------------------------------- | ------------------------------------- | ----------- |
| `mora`     | a new block of ``r_task`` rank-1 experts       | self-activated top-k over experts     | none        |
| `seq_lora` | one block, grown at the first task, trained    | none (plain LoRA of rank ``r_task``)  | none        |
|            | again on every later task                      |                                       |             |
| `olora`    | a new block; earlier ones frozen               | none (plain LoRA of the whole bank)   | O-LoRA      |
| `moe_lora` | a new block = one task expert; earlier frozen  | learned router over blocks, top-k     | none        |

The bank and gate settings a method implies are applied to the config when it is built
(``RunConfig._apply_method``); this module holds what differs while a run goes: whether a task grows a block
(``grows_block``), the loss added to the task loss (``extra_loss``), and which world sizes a method supports
(``check_world``). Pruning is off for every baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from mora_dist.config import METHODS, ConfigError, RunConfig
from mora_dist.mora import mora_layers

__all__ = ["METHODS", "check_world", "extra_loss", "grows_block", "l2_penalty", "orthogonality_penalty"]


def grows_block(cfg: RunConfig, index: int) -> bool:
    """Whether task ``index`` starts with a new block; otherwise the last block is made trainable again
    (``seq_lora`` after its first task)."""
    return not (cfg.method == "seq_lora" and index > 0)


def orthogonality_penalty(model: nn.Module) -> torch.Tensor | None:
    """O-LoRA's orthogonality loss: ``Σ_layers Σ_jk |(A_new A_oldᵀ)_jk|`` between the active block's keys and
    all frozen keys of the same layer (``torch.abs(A_new @ A_old.T).sum()`` in the authors' code).

    Returns ``None`` when no layer has both an active and a frozen block (the first task).
    """
    total = None
    for layer in mora_layers(getattr(model, "module", model)).values():
        if layer.mora_A is None or layer.mora_A_frozen is None or not layer.mora_A_frozen.shape[0]:
            continue
        term = torch.abs(layer.mora_A @ layer.mora_A_frozen.T).sum()
        total = term if total is None else total + term
    return total


def l2_penalty(model: nn.Module) -> torch.Tensor | None:
    """O-LoRA's norm term on the new block: ``Σ_layers ‖A_new‖_F + ‖B_new‖_F`` (``torch.norm(p=2)`` per new
    parameter in the authors' code, not squared). ``None`` when no layer has an active block."""
    total = None
    for layer in mora_layers(getattr(model, "module", model)).values():
        if layer.mora_A is None:
            continue
        term = torch.linalg.vector_norm(layer.mora_A) + torch.linalg.vector_norm(layer.mora_B)
        total = term if total is None else total + term
    return total


def extra_loss(model: nn.Module, cfg: RunConfig) -> torch.Tensor | None:
    """The loss a method adds to the task loss of an optimizer step (once per step, not per micro-batch):
    for ``olora`` ``lambda_orth · orthogonality_penalty + lambda_l2 · l2_penalty``; ``None`` for the others,
    and when every term is absent or has weight 0."""
    if cfg.method != "olora":
        return None
    terms = []
    if cfg.olora.lambda_orth:
        orth = orthogonality_penalty(model)
        if orth is not None:
            terms.append(cfg.olora.lambda_orth * orth)
    if cfg.olora.lambda_l2:
        l2 = l2_penalty(model)
        if l2 is not None:
            terms.append(cfg.olora.lambda_l2 * l2)
    return sum(terms[1:], terms[0]) if terms else None


def check_world(cfg: RunConfig, world_size: int) -> None:
    """Refuse what a method does not support at this world size.

    Raises:
        ConfigError: ``olora`` with more than one worker (its penalty is not added in the DeepSpeed training
            loop, where under ZeRO-3 the frozen keys are partitioned outside the forward).
    """
    if cfg.method == "olora" and world_size > 1:
        raise ConfigError(f"method=olora runs in one process only (this launch has {world_size} workers): its "
                          "penalty is not part of the DeepSpeed training loop; run it without a distributed "
                          "launcher")
