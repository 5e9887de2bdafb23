"""Finding target modules in a Hugging Face causal LM, replacing them with ``MoRALinear``, and acting on all
MoRA layers at once (grow, freeze, select trainable parameters)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from mora_dist.mora.config import DEFAULT_TARGETS, MoRAConfig, MoRAConfigError
from mora_dist.mora.layer import MoRALinear

ADAPTER_PREFIX = "mora_"


def is_adapter_parameter(name: str) -> bool:
    """True for adapter parameters: their last name component starts with ``mora_``.

    The optimizer, checkpoints and ``requires_grad`` all use this one test.
    """
    return name.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)


def default_targets(model: nn.Module, include_mlp: bool = False) -> list[str]:
    """The default target names for the model's architecture (``config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        known = ", ".join(sorted(DEFAULT_TARGETS))
        raise MoRAConfigError(
            f"no default MoRA targets for architecture {model_type!r} (known: {known}); "
            f"set mora.target_modules, e.g. to names from: {', '.join(linear_names(model)) or 'none'}")
    attention, mlp = DEFAULT_TARGETS[model_type]
    return list(attention) + (list(mlp) if include_mlp else [])


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's ``nn.Linear`` modules (the valid targets)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    return sorted(names)


def mora_layers(model: nn.Module) -> dict[str, MoRALinear]:
    """All MoRA layers of a model by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoRALinear)}


def inject_mora(model: nn.Module, config: MoRAConfig) -> list[str]:
    """Replace the target linear layers of ``model`` with ``MoRALinear`` (in place) and freeze the base.

    The bank starts empty; call ``add_block`` at the start of each task.

    Returns:
        The qualified names of the adapted modules.

    Raises:
        MoRAConfigError: a target name that matches no linear layer, listing the candidates.
    """
    if mora_layers(model):
        raise MoRAConfigError("the model already has MoRA layers; inject once")
    targets = list(config.target_modules) or default_targets(model, config.include_mlp)
    candidates = linear_names(model)
    unknown = [t for t in targets if t not in candidates]
    if unknown:
        raise MoRAConfigError(
            f"mora.target_modules: {unknown} match no linear layer of this model; "
            f"candidates: {', '.join(candidates)}")
    model.requires_grad_(False)
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MoRALinear(module, dropout=config.dropout, **config.gate_settings())
        layer.train(module.training)  # a new module defaults to train mode; keep the model's mode
        setattr(parent, child, layer)
        replaced.append(name)
    model.mora_config = config
    return replaced


def _layers_or_error(model: nn.Module) -> dict[str, MoRALinear]:
    layers = mora_layers(model)
    if not layers:
        raise ValueError("the model has no MoRA layers: call inject_mora first")
    return layers


def add_block(model: nn.Module, name: str, config: MoRAConfig | None = None) -> None:
    """Grow every MoRA layer by one trainable block of ``config.r_task`` experts; earlier blocks are frozen.

    Call it at the start of a task, so that no untrained block is ever left in the bank.
    """
    config = config or model.mora_config
    for layer in _layers_or_error(model).values():
        layer.add_block(name, config.r_task, config.block_scale)


def freeze_blocks(model: nn.Module) -> None:
    """Freeze the active block of every layer (end of a task)."""
    for layer in _layers_or_error(model).values():
        layer.freeze_active()


def unfreeze_last_block(model: nn.Module) -> None:
    """Make the last (frozen) block of every layer trainable again: sequential LoRA trains one block on every
    task instead of growing a new one."""
    for layer in _layers_or_error(model).values():
        layer.unfreeze_last()


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters to optimise: adapter parameters that require grad (the active block)."""
    for name, param in model.named_parameters():
        if param.requires_grad and is_adapter_parameter(name):
            yield name, param


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per layer, the whole bank in block order: ``<layer>.A`` (R × d_in) and ``<layer>.B`` (d_out × R), plus
    ``<layer>.router`` (n_blocks × d_in) in gate mode "router"."""
    state = {}
    for name, layer in _layers_or_error(model).items():
        router = layer.router()
        if router is not None:
            state[f"{name}.router"] = router.detach()
        bank = layer.bank()
        if bank is None:
            continue
        state[f"{name}.A"] = bank[0].detach()
        state[f"{name}.B"] = bank[1].detach()
    return state
