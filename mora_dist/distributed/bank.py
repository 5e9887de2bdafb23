"""Changes to the expert bank (grow, unfreeze, freeze, prune, load, save) that run the same in one process and
under ZeRO-3.

Every change goes through one gathering context, ``gathered``: off ZeRO-3 it does nothing; under ZeRO-3 it
gathers the partitioned adapter parameters whole on every worker for the duration of the block (DeepSpeed's
``GatheredParameters``), so the plain MoRA methods of ``mora_dist.mora`` change full tensors. The replaced
parameters are plain tensors afterwards; the next engine partitions them again (rank 0's values are broadcast
then). Both trainers (``run/trainer.py`` and ``distributed/trainer.py``) call these functions.

This module does not import deepspeed: a partitioned parameter only exists once the engine module has loaded it,
and only then is the engine asked to gather.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from mora_dist.distributed.env import barrier, is_main
from mora_dist.mora import add_block, adapter_state_dict, freeze_blocks, is_adapter_parameter, unfreeze_last_block
from mora_dist.mora.adapter import describe_adapter, load_adapter as _load_adapter, write_adapter


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (its data lives in partitions across workers)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]):
    """Full tensors of ``params`` on every worker inside the block; a no-op off ZeRO-3.

    A collective under ZeRO-3: every worker must enter it with the same parameters.
    """
    zero_params = [p for p in params if is_partitioned(p)]
    if not zero_params:
        yield
        return
    from mora_dist.distributed.engine import gathered_parameters

    with gathered_parameters(zero_params):
        yield


def adapter_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Every MoRA parameter of ``model`` (frozen bank and active block)."""
    return [p for n, p in model.named_parameters() if is_adapter_parameter(n)]


def bank_gathered(model: nn.Module):
    """The gathering context around a change of ``model``'s bank (every MoRA parameter)."""
    return gathered(adapter_parameters(model))


def gathered_state(model: nn.Module, predicate: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Copies of the full parameters whose names satisfy ``predicate``, on every worker (snapshots, checks)."""
    named = [(n, p) for n, p in model.named_parameters() if predicate(n)]
    with gathered(p for _, p in named):
        return {n: p.detach().clone() for n, p in named}


def gathered_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole bank of every MoRA layer (``<layer>.A``, ``<layer>.B``) as full tensors on every worker."""
    with bank_gathered(model):
        return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def grow(model: nn.Module, name: str, seed: int | None = None, config=None) -> None:
    """Start a task: freeze the active block and append a new trainable block.

    Args:
        seed: seeds the new keys' initialisation without touching the global RNG (the same on every worker and
            in a one-process run; the keys are drawn from the CPU generator, on a GPU too); ``None`` uses the
            global RNG (workers then get rank 0's values at engine build).
    """
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with bank_gathered(model), rng:
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)  # the CPU's only: a GPU's generator is left alone
        add_block(model, name, config)


def unfreeze_last(model: nn.Module) -> None:
    """Start a task on the last block again instead of a new one (seq_lora)."""
    with bank_gathered(model):
        unfreeze_last_block(model)


def freeze(model: nn.Module) -> None:
    """End a task: move the active block into the frozen bank."""
    with bank_gathered(model):
        freeze_blocks(model)


def prune(model: nn.Module, decision: dict) -> None:
    """Remove the experts named by a pruning decision from the bank."""
    from mora_dist.mora.pruning import apply_pruning

    with bank_gathered(model):
        apply_pruning(model, decision)


def load_adapter(model: nn.Module, directory: str | Path, trainable_last: bool | None = None):
    """Load an adapter saved at any world size onto ``model`` (every worker reads the folder)."""
    with bank_gathered(model):
        return _load_adapter(model, directory, trainable_last=trainable_last)


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Save the adapter: gathered on every worker, written atomically by rank 0 only.

    A collective: every worker must call it. Returns the folder (written when this returns on any rank).
    """
    state = gathered_adapter_state(model)
    description = describe_adapter(model)
    for layer, info in description["layers"].items():  # a bank with experts must come back whole
        if sum(info["block_sizes"]) and not state[f"{layer}.A"].numel():
            raise RuntimeError(f"{layer}: the gathered bank is empty; was it gathered under ZeRO-3?")
    if is_main():
        write_adapter(state, description, directory)
    barrier()
    return Path(directory)
