"""Measuring what a training step holds, to check the capacity planner (``mora_dist.plan``) against reality.

* ``saved_tensor_bytes``: the bytes autograd saves for backward during a forward, counted once per storage
  (q/k/v share their input), parameters and buffers excluded (saving a weight costs nothing new).
* ``checkpoint_input_bytes``: what activation checkpointing keeps instead: the hidden states entering each
  decoder block (non-reentrant checkpointing holds them outside autograd's saved tensors, so hooks miss them).
* ``parameter_bytes``: storage held by this process for parameters, the ZeRO-3 partition (``ds_tensor``)
  where DeepSpeed partitions them.
"""

from __future__ import annotations

import contextlib

import torch


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


@contextlib.contextmanager
def saved_tensor_bytes(model: torch.nn.Module):
    """Count the bytes saved for backward inside the block; yields a dict whose ``bytes`` is filled on exit.

    Each storage is counted once (views of one tensor, or one tensor saved by several operations); tensors
    sharing storage with a parameter or buffer of ``model`` are skipped. Works for any dtype and device.
    """
    skip = {_storage_key(p) for p in model.parameters() if p.numel()}
    skip |= {_storage_key(b) for b in model.buffers() if b.numel()}
    seen: dict[tuple[int, int], int] = {}
    result = {"bytes": 0, "tensors": 0}

    def pack(t):
        if t.device.type != "meta" and t.numel():
            key = _storage_key(t)
            if key not in skip and key not in seen:
                seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())
    result["tensors"] = len(seen)


@contextlib.contextmanager
def checkpoint_input_bytes(blocks):
    """Sum the bytes of the hidden states entering each of ``blocks`` (decoder layers) during the block."""
    result = {"bytes": 0}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if torch.is_tensor(hidden):
            result["bytes"] += hidden.numel() * hidden.element_size()

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield result
    finally:
        for h in handles:
            h.remove()


def parameter_bytes(model: torch.nn.Module, predicate=None) -> int:
    """Bytes of parameter storage this process holds (the ZeRO-3 partition where partitioned)."""
    total = 0
    for name, p in model.named_parameters():
        if predicate is not None and not predicate(name):
            continue
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        total += t.numel() * t.element_size()
    return total
