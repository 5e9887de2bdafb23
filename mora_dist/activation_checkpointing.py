"""Activation (gradient) checkpointing of a transformers model's decoder blocks, for ``train.gradient_checkpointing``.

Non-reentrant ``torch.utils.checkpoint``: each decoder block keeps only its input hidden states in the forward
and runs again inside the backward. Why this is safe for MoRA:

* the recomputed forward sees the same dropout masks: ``checkpoint`` stashes the RNG state (CPU and CUDA) before
  the block and restores it for the recomputation (``preserve_rng_state=True``, its default);
* the gate is an ``autograd.Function``: its saved tensors are dropped and re-created like any other op's, and
  its hand-written backward runs on the recomputed ones;
* the adapters' gradients flow: non-reentrant checkpointing tracks parameters that require grad inside the
  block whatever its inputs; transformers also makes the embedding output require grad
  (``enable_input_require_grads``), as peft does for frozen bases;
* under ZeRO-3 the recomputation gathers the block's parameters again through DeepSpeed's module hooks.

The same losses and adapters as without checkpointing (within float tolerance) are tested in one process and
under 2-worker ZeRO-2/3 runs.
"""

from __future__ import annotations

from torch import nn


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder block of ``model`` (non-reentrant); active in train mode only.

    Raises:
        ValueError: the model's class does not support checkpointing (names the class).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing; set "
                         "train.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # a cache is useless in training and transformers warns about it


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that run checkpointed (transformers' ``GradientCheckpointingLayer`` with the flag on)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
            and type(m).__name__.endswith(("DecoderLayer", "Block", "Layer"))]
