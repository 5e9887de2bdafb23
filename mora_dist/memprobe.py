"""Measuring what a training step holds, to check the capacity planner (``mora_dist.plan``) against reality.

* ``saved_tensor_bytes``: the bytes autograd saves for backward during a forward, counted once per storage
  (q/k/v share their input), parameters and buffers excluded (saving a weight costs nothing new).
  Under non-reentrant activation checkpointing the blocks' inputs are what it sees (checkpointing saves them
  through the same hooks); the block recomputed in backward is not seen.
* ``parameter_bytes``: storage held by this process for parameters: under ZeRO-3 the partition (``ds_tensor``)
  and, for the small parameters DeepSpeed keeps gathered, the whole tensor too.
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
    params = list(model.parameters()) + list(model.buffers())
    seen: dict[tuple[int, int], int] = {}
    result = {"bytes": 0, "tensors": 0}

    def pack(t):
        if t.device.type != "meta" and t.numel():
            key = _storage_key(t)
            # parameters are looked up when saved: under ZeRO-3 their storage exists only while gathered
            if key not in seen and not any(p.numel() and p.untyped_storage().data_ptr() == key[0] for p in params):
                seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())
    result["tensors"] = len(seen)


def parameter_bytes(model: torch.nn.Module, predicate=None) -> int:
    """Bytes of parameter storage this process holds: under ZeRO-3 the partition (``ds_tensor``) plus the whole
    tensor where it is gathered (persistent small parameters; call it outside forwards)."""
    total = 0
    for name, p in model.named_parameters():
        if predicate is not None and not predicate(name):
            continue
        if hasattr(p, "ds_tensor"):  # the partition, plus the whole tensor where DeepSpeed keeps it gathered
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
            total += p.data.numel() * p.data.element_size()
        else:
            total += p.numel() * p.element_size()
    return total
