"""Adapter files: ``adapter.safetensors`` (the banks) and ``adapter.json`` (blocks, scales, layer config).

Layout of ``adapter.json``::

    {"format": "mora_dist.adapter", "version": 1,
     "mora": {...MoRAConfig...},
     "blocks": [{"name": "task0", "scale": 2.0}, ...],        # in creation order
     "layers": {"model.layers.0.self_attn.q_proj": {"in_features": 576, "out_features": 576,
                                                    "block_sizes": [8, 6]}, ...},
     # adapter.safetensors: "<layer>.A", "<layer>.B", and "<layer>.router" (one row per block) when
     # mora.gate is "router" (the MoE-LoRA baseline)
     "active_block": false,                                   # true only in mid-task checkpoints
     "base_model": {"model_type": "llama", "name_or_path": "..."}}

Both files are written to a temporary folder and moved into place, so a crash never leaves half an adapter.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mora_dist.io import atomic_write_dir, recover_dir
from mora_dist.mora.config import MoRAConfig, MoRAConfigError
from mora_dist.mora.inject import adapter_state_dict, inject_mora, mora_layers

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter.json"
FORMAT = "mora_dist.adapter"


class AdapterError(ValueError):
    """An adapter that does not fit the model or is malformed."""


def describe_adapter(model: nn.Module) -> dict:
    """The JSON description of the model's MoRA banks."""
    layers = mora_layers(model)
    first = next(iter(layers.values()))
    config = getattr(model, "mora_config", MoRAConfig())
    return {
        "format": FORMAT,
        "version": 1,
        "mora": config.to_dict(),
        "blocks": [{"name": n, "scale": s} for n, s in zip(first.block_names, first.block_scales)],
        "layers": {name: {"in_features": l.in_features, "out_features": l.out_features,
                          "block_sizes": list(l.block_sizes)} for name, l in layers.items()},
        "active_block": first.has_active_block,
        "base_model": {"model_type": getattr(getattr(model, "config", None), "model_type", None),
                       "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)},
    }


def write_adapter(state: dict[str, torch.Tensor], description: dict, directory: str | os.PathLike) -> Path:
    """Write tensors and description atomically into ``directory`` (replaced if it exists)."""
    def fill(tmp: Path) -> None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(description, indent=2))

    return atomic_write_dir(directory, fill, fault="adapter_write")  # fault: both files written, not in place


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save the model's MoRA banks (one process; under ZeRO-3 use the engine's gathered save)."""
    return write_adapter(adapter_state_dict(model), describe_adapter(model), directory)


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and description of an adapter folder, checked for consistency."""
    directory = Path(directory)
    recover_dir(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterError(f"{directory}: not an adapter folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        description = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{cfg_path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if description.get("format") != FORMAT:
        raise AdapterError(f"{cfg_path}: field 'format' must be {FORMAT!r}")
    return load_file(str(w_path)), description


# Gate settings that change what a trained bank computes; the first four may differ by request (``gate_from``).
TUNABLE_GATE = ("k", "tau", "delta", "delta_mode", "eps")
STRUCTURAL_GATE = ("gate", "router_top_k")
GATE_FROM = ("same", "adapter", "model")


def _gate_config(model: nn.Module, saved: MoRAConfig, directory, gate_from: str) -> MoRAConfig:
    """The MoRA config to load with: the adapter's, reconciled with the gate settings ``model`` was injected with."""
    if gate_from not in GATE_FROM:
        raise AdapterError(f"gate_from={gate_from!r}: choose one of {', '.join(GATE_FROM)}")
    current = getattr(model, "mora_config", None)
    if current is None or not mora_layers(model):
        return saved  # a plain base model: the adapter's settings, nothing to reconcile
    differ = {f: (getattr(current, f), getattr(saved, f)) for f in TUNABLE_GATE + STRUCTURAL_GATE
              if getattr(current, f) != getattr(saved, f)}
    if not differ:
        return saved
    listing = ", ".join(f"{f}: model {m!r} vs adapter {a!r}" for f, (m, a) in differ.items())
    structural = [f for f in differ if f in STRUCTURAL_GATE]
    if gate_from == "same" or (gate_from == "model" and structural):
        how = ("load it onto a base model injected with the adapter's gate mode" if structural and gate_from == "model"
               else "pass gate_from='adapter' to use the adapter's settings, or gate_from='model' to keep the "
                    "model's (e.g. to evaluate with another k, tau or delta)")
        raise AdapterError(f"{directory}: the model was injected with other gate settings than the adapter was "
                           f"saved with ({listing}); {how}")
    if gate_from == "adapter":
        print(f"[mora-dist] {directory}: the adapter's gate settings replace the model's ({listing})",
              file=sys.stderr, flush=True)
        return saved
    print(f"[mora-dist] {directory}: keeping the model's gate settings ({listing})", file=sys.stderr, flush=True)
    return replace(saved, **{f: getattr(current, f) for f in TUNABLE_GATE})


def load_adapter(model: nn.Module, directory: str | os.PathLike, trainable_last: bool | None = None,
                 gate_from: str = "same") -> nn.Module:
    """Inject MoRA into a fresh base ``model`` (if needed) and load an adapter onto it, in place.

    Args:
        model: the base model the adapter was trained on (same architecture and shapes).
        directory: an adapter folder written by ``save_adapter``.
        trainable_last: keep the last block trainable (resume a mid-task checkpoint). Default: as saved.
        gate_from: when ``model`` already carries MoRA layers injected with other gate settings (k, tau, delta,
            ...) than the adapter's: ``same`` (default) refuses, ``adapter`` uses the adapter's and says so,
            ``model`` keeps the model's k/tau/delta/delta_mode/eps and says so (the gate mode must match).

    Raises:
        AdapterError: the adapter does not fit the model (names the layer, the expected and found shapes), or its
            gate settings differ from the model's and ``gate_from`` does not say which win.
    """
    state, desc = read_adapter(directory)
    try:
        saved = MoRAConfig.from_dict(desc["mora"])  # also adapters saved with the former gated + gate pair
    except MoRAConfigError as err:
        raise AdapterError(f"{Path(directory) / CONFIG_NAME}: field 'mora': {err}") from err
    config = _gate_config(model, saved, directory, gate_from)
    if not mora_layers(model):
        inject_mora(model, config)
    layers = mora_layers(model)
    missing = sorted(set(desc["layers"]) - set(layers))
    if missing:
        raise AdapterError(f"{directory}: adapter layers not in this model: {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}; was it trained on another architecture?")
    active = desc.get("active_block", False) if trainable_last is None else trainable_last
    names = [b["name"] for b in desc["blocks"]]
    scales = [float(b["scale"]) for b in desc["blocks"]]
    for name, layer in layers.items():
        info = desc["layers"].get(name)
        if info is None:
            raise AdapterError(f"{directory}: the adapter has no entry for layer {name}")
        if (info["in_features"], info["out_features"]) != (layer.in_features, layer.out_features):
            raise AdapterError(
                f"{directory}: layer {name} has shape in={layer.in_features}, out={layer.out_features} in this "
                f"model but in={info['in_features']}, out={info['out_features']} in the adapter; load it onto "
                "the base model it was trained on")
        sizes = info["block_sizes"]
        if sum(sizes):
            A, B = state[f"{name}.A"], state[f"{name}.B"]
        else:
            A = torch.zeros(0, layer.in_features)
            B = torch.zeros(layer.out_features, 0)
        ref = layer.base_layer.weight
        router = state.get(f"{name}.router")
        if config.gate == "router" and router is None:
            raise AdapterError(f"{directory}: layer {name}: the adapter's gate is 'router' but it holds no "
                               f"'{name}.router' tensor; the file is incomplete")
        try:
            layer.clear_bank()  # the gate mode may change with the adapter (it decides whether blocks route)
            layer.set_gate(**config.gate_settings())
            layer.set_bank(A.to(ref.dtype), B.to(ref.dtype), names, sizes, scales, active_last=active,
                           router=None if router is None else router.to(ref.dtype))
        except ValueError as err:
            raise AdapterError(f"{directory}: layer {name}: {err}") from err
    model.mora_config = config
    return model
