"""Output-bounded rank pruning: the decision, its hash, and its application to the bank.

The statistics pass (``mora_dist.distributed.stats.collect_statistics``) measures, per layer, a ladder of nested
removals from the new (last) block on the layer's real inputs (``mora_dist.mora.removal``) and sums it over all
workers with the task's one all-reduce. ``decide_pruning`` is a pure function of those global sums, so every
worker takes the same decision; ``decision_hash`` is what the workers compare to prove it. Nested prefixes of one
fixed order (``removal.removal_order``, computed from the weights alone) are what makes a single all-reduce
possible: any other subset would need its own measured forward. See docs/design.md, Pruning.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

from mora_dist.mora.inject import mora_layers
from mora_dist.mora.removal import relative_changes


def _bare(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the model


def decide_pruning(stats: dict, model: nn.Module | None, prune_cfg) -> dict:
    """Which experts of the new (last) block to remove, per layer; a pure function of the global statistics.

    ``model`` (optional) is checked to have the banks the statistics were taken on.

    Per layer, the largest rung ``j`` of the measured removal ladder whose relative output change is at most
    ``prune_cfg.max_output_change`` and that keeps at least ``prune_cfg.min_keep`` experts; the removed experts
    are the first ``j`` of the ladder's order. Nothing is removed when pruning is disabled, a layer saw no
    tokens, or has no complete ladder. The measured ladder is recorded either way (what pruning would do).

    Returns:
        ``{"block": index, "block_name": str, "rule": {...}, "layers": {name: {"remove": [...], "keep": [...],
        "output_change": change of the chosen removal, "ladder": change per rung, "order": removal order}},
        "hash": sha256 of the canonical decision}`` (indices local to the block).
    """
    if model is not None:
        layers = mora_layers(_bare(model))
        for name, entry in stats["layers"].items():
            if name not in layers or list(layers[name].block_sizes) != entry["block_sizes"]:
                raise ValueError(f"statistics of layer {name} (blocks {entry['block_sizes']}) do not match the "
                                 "model's bank; collect them again after the last bank change")
    bound = float(prune_cfg.max_output_change)
    layers_out = {}
    block_index = block_name = None
    for name, entry in stats["layers"].items():
        sizes = entry["block_sizes"]
        if not sizes:
            continue
        b = len(sizes) - 1
        block_index, block_name = b, entry["block_names"][b]
        size = sizes[b]
        ladder = entry.get("ladder")
        changes = relative_changes(ladder) if ladder is not None else None
        chosen = 0
        if prune_cfg.enabled and entry["tokens"] > 0 and size > 0 and changes is not None:
            keep_min = min(int(prune_cfg.min_keep), size)
            for j, change in enumerate(changes):
                if j <= size - keep_min and change <= bound:
                    chosen = j
        drop = set(entry["ladder_order"][:chosen]) if chosen else set()
        layers_out[name] = {"remove": sorted(drop), "keep": [i for i in range(size) if i not in drop],
                            "output_change": changes[chosen] if changes is not None else None,
                            "ladder": changes, "order": entry.get("ladder_order")}
    decision = {"block": block_index, "block_name": block_name,
                "rule": {"enabled": bool(prune_cfg.enabled), "max_output_change": bound,
                         "min_keep": int(prune_cfg.min_keep)},
                "layers": layers_out}
    decision["hash"] = decision_hash(decision)
    return decision


def decision_hash(decision: dict) -> str:
    """sha256 of the canonical JSON of what a decision does: block, rule, and per layer the removed and kept
    experts (the measured values beside them are left out: sums taken in another order may differ in the
    last bits while the decision is the same)."""
    body = {"block": decision["block"], "block_name": decision["block_name"], "rule": decision.get("rule"),
            "layers": {n: {"remove": e["remove"], "keep": e["keep"]} for n, e in decision["layers"].items()}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def apply_pruning(model: nn.Module, decision: dict) -> int:
    """Remove the decided experts from every layer's bank (plain tensors; under ZeRO-3 use
    ``mora_dist.distributed.bank.prune``, which gathers first). Returns the number of experts removed."""
    layers = mora_layers(_bare(model))
    removed = 0
    for name, entry in decision["layers"].items():
        if name not in layers:
            raise KeyError(f"pruning decision names layer {name!r}, which this model does not have")
        layer = layers[name]
        if layer.block_names[decision["block"]] != decision["block_name"]:
            raise ValueError(f"{name}: block {decision['block']} is {layer.block_names[decision['block']]!r}, "
                             f"the decision was made for {decision['block_name']!r}")
        if entry["remove"]:
            layer.remove_experts(decision["block"], entry["remove"])
            removed += len(entry["remove"])
    return removed
