"""Continual-learning methods as settings of one rank bank and one orchestrator (``RunConfig.method``).

| method     | bank per task                                  | gate (``mora.gate``)                  | extra loss  |
| ---------- | ---------------------------------------------- | ------------------------------------- | ----------- |
| `mora`     | a new block of ``r_task`` rank-1 experts       | ``self``: self-activated top-k        | none        |
| `seq_lora` | one block, grown at the first task, trained    | ``none`` (plain LoRA of rank r_task)  | none        |
|            | again on every later task                      |                                       |             |
| `olora`    | a new block; earlier ones frozen               | ``none`` (plain LoRA of the bank)     | O-LoRA      |
| `moe_lora` | a new block = one task expert; earlier frozen  | ``router``: learned, top-k blocks     | none        |

Everything method-specific lives here: the settings a method implies (``apply_method``, run when a
``RunConfig`` is built), the baselines' own settings (``OLoRAConfig``, ``MoELoRAConfig``), the variants the
comparison runs besides the methods (``VARIANTS``: ``mora_noprune``), whether a task grows a block
(``grows_block``), whether statistics are collected (``collects_statistics``), the loss added to the task loss
(``extra_loss``), and which world sizes a method supports (``check_world``). Pruning is off for every baseline.
The gates themselves are computed in ``mora_dist.mora.gate``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mora_dist.errors import ConfigError
from mora_dist.mora.inject import mora_layers

if TYPE_CHECKING:  # the run config is built on this module; it is only a type here
    from mora_dist.config import RunConfig

__all__ = ["METHODS", "VARIANTS", "MoELoRAConfig", "OLoRAConfig", "apply_method", "check_world",
           "collects_statistics", "extra_loss", "grows_block", "l2_penalty", "orthogonality_penalty"]

METHODS = ("mora", "seq_lora", "olora", "moe_lora")
# what ``mora-dist compare --methods`` accepts: every method, and variants as (method, overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {m: (m, []) for m in METHODS}
VARIANTS["mora_noprune"] = ("mora", ["prune.enabled=false"])


@dataclass
class OLoRAConfig:
    """O-LoRA baseline (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning").

    Loss added at every optimizer step: ``lambda_orth · Σ_layers Σ |A_new A_oldᵀ|`` (the authors' code: the L1
    norm of the products of the new block's keys with all frozen keys; the paper writes the squared entries)
    plus ``lambda_l2 · Σ_layers (‖A_new‖_F + ‖B_new‖_F)`` (the code's ``torch.norm(p=2)`` of each new
    parameter, not squared; the paper's objective has no such term).

    Attributes:
        lambda_orth: weight of the orthogonality penalty; the authors' scripts use 0.5.
        lambda_l2: weight of the norm penalty on the new block; the authors' scripts use 0.
    """

    lambda_orth: float = 0.5
    lambda_l2: float = 0.0

    def __post_init__(self):
        for key in ("lambda_orth", "lambda_l2"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"olora.{key}={value!r}: must be a number >= 0")


@dataclass
class MoELoRAConfig:
    """MoE-LoRA baseline: one LoRA expert (a block of ``mora.r_task`` experts) per task with a learned router per
    layer; earlier experts and their router rows are frozen.

    Attributes:
        top_k: tasks' experts kept per token, 1 or 2 (more is allowed); top-1 weights the kept expert by its
            softmax probability over all experts (Switch Transformer), top-k >= 2 by a softmax over the kept.
    """

    top_k: int = 2

    def __post_init__(self):
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ConfigError(f"moe_lora.top_k={self.top_k!r}: must be an integer >= 1")


def apply_method(cfg: RunConfig) -> None:
    """Check ``cfg.method`` and set the bank and pruning settings it implies (in place).

    ``mora`` keeps the config's gate (``self``, or ``none`` for ungated MoRA) but refuses the router; the
    baselines turn pruning off and set the gate: ``none`` for seq_lora and olora, ``router`` with
    ``router_top_k = moe_lora.top_k`` for moe_lora. The values set were checked where they came from.

    Raises:
        ConfigError: an unknown method (with a suggestion), or ``mora.gate: router`` with ``method: mora``.
    """
    if cfg.method not in METHODS:
        close = difflib.get_close_matches(str(cfg.method), METHODS, n=1)
        raise ConfigError(f"method={cfg.method!r} is invalid: choose one of {', '.join(METHODS)}"
                          + (f" (did you mean {close[0]}?)" if close else ""))
    if cfg.method == "mora":
        if cfg.mora.gate == "router":
            raise ConfigError(f"mora.gate={cfg.mora.gate!r} with method=mora: the router gate is the "
                              "MoE-LoRA baseline; set method: moe_lora (and moe_lora.top_k) instead")
        return
    cfg.prune.enabled = False
    if cfg.method in ("seq_lora", "olora"):
        cfg.mora.gate = "none"
    else:  # moe_lora
        cfg.mora.gate, cfg.mora.router_top_k = "router", cfg.moe_lora.top_k


def collects_statistics(cfg: RunConfig) -> bool:
    """Whether a task's expert statistics are collected: for pruning, or for the usage telemetry of a gated bank.

    An ungated bank with pruning off (``seq_lora``, ``olora``) uses every expert on every token: there is nothing
    to decide and no usage to report, so its statistics stage is skipped rather than spent on forwards.
    """
    return cfg.prune.enabled or cfg.mora.gate != "none"


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
