"""Where a process computes: its own GPU when the machine has CUDA, else the CPU.

Every entry point that builds a model (``run``, ``compare``, ``eval``, ``generate``, ``demo``, the selftest) puts it
on ``compute_device()``, and the code that feeds a model moves each batch to the model's device (``to_device``), so
that one process on one GPU trains there, and workers under ZeRO 0-2 evaluate and collect statistics there before
DeepSpeed's engine exists. Worker ``LOCAL_RANK`` takes GPU ``LOCAL_RANK`` (what the launchers and DeepSpeed
assume). Under ZeRO-3 ``deepspeed.zero.Init`` places the partitions itself. ``CUDA_VISIBLE_DEVICES=`` (empty)
keeps a GPU machine's run on the CPU.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def compute_device() -> torch.device:
    """This worker's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with every tensor on ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

