"""The MoRA layer: a bank of rank-1 LoRA experts with self-activated sparse gating (docs/design.md, The method)."""

from mora_dist.mora.config import MoRAConfig
from mora_dist.mora.layer import MoRALinear
from mora_dist.mora.inject import (
    ADAPTER_PREFIX,
    add_block,
    adapter_state_dict,
    freeze_blocks,
    inject_mora,
    is_adapter_parameter,
    mora_layers,
    trainable_parameters,
    unfreeze_last_block,
)
from mora_dist.mora.adapter import load_adapter, save_adapter

__all__ = [
    "ADAPTER_PREFIX", "MoRAConfig", "MoRALinear", "add_block", "adapter_state_dict", "freeze_blocks",
    "inject_mora", "is_adapter_parameter", "load_adapter", "mora_layers", "save_adapter", "trainable_parameters",
    "unfreeze_last_block",
]
