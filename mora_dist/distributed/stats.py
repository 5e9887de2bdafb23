"""Routing statistics of a task, combined over workers with one all-reduce, and output-bounded rank pruning.

After a task is trained, ``collect_statistics`` runs forwards only, with inference gating (eval mode), over the
task's data and accumulates per layer and per expert: tokens on which the expert was selected, ``Σ w`` and the
contribution mass ``Σ |w z| · ‖B‖``, plus the token count (padding skipped) — the routing telemetry, kept for
every expert of every block.

Pruning must keep what the layer computes. Removing an expert changes every token's scores (it counts in the
shared norm ``‖z‖`` even where it is never selected), so usage or mass alone cannot tell whether a removal is
harmless: it is measured. In the same forwards, each layer evaluates a ladder of nested removals from the new
(last) block on its real inputs (``mora_dist.mora.removal``): the block's experts are ordered by ``‖A_i‖·‖B_i‖``
(computed from the weights, identical on every worker, so known before any communication), rung ``j`` removes the
first ``j``, and the pruned bank's gate is run again so the norm and top-k effects are included. Per rung the
layer sums ``‖Y_j − Y_full‖²`` and once ``‖Y_full‖²`` (Y: the adapter's output, the delta it adds to ``W0 x``).

All of it — usage sums and ladder sums of every layer — is flattened into one float64 tensor and all-reduced
**once** per task, so every worker holds the same global sums. ``decide_pruning`` is a pure function of them:
per layer, the largest rung whose relative change ``‖Y_j − Y_full‖_F / ‖Y_full‖_F`` over all statistics tokens of
all workers is at most ``prune.max_output_change``, keeping at least ``prune.min_keep`` experts; hence identical
on every worker (``check_decision_agrees`` proves it by comparing a hash). A rung is a real bank, so the recorded
change of the chosen rung is exactly the change the pruning causes on that data. (Nested prefixes of one fixed
order are what makes a single all-reduce possible: any subset would need its own measured forward.)
Needs only ``torch.distributed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from mora_dist.distributed.env import world_size
from mora_dist.io import atomic_write_json
from mora_dist.mora import mora_layers
from mora_dist.mora.removal import relative_changes

SUM_KEYS = ("selected", "weight_sum", "mass")


def _bare(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the model


def _partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@torch.no_grad()
def collect_statistics(model: nn.Module, batches: Iterable[dict], *, forward: Callable | None = None,
                       check_lockstep: bool = True, min_keep: int | None = 1) -> dict:
    """Per-layer, per-expert routing statistics and the removal ladder of ``batches``, summed over all workers.

    Args:
        model: the model with MoRA layers, or a DeepSpeed engine (then its forward is used, which under
            ZeRO-3 gathers parameters).
        batches: this worker's share of the data: dicts with ``input_ids`` and ``attention_mask``.
        forward: called as ``forward(input_ids=..., attention_mask=...)``; default ``model``.
        check_lockstep: under ZeRO-3 first check that every worker has the same number of batches (a mismatch
            would deadlock in the parameter gathers); raises ``ValueError`` on every worker instead.
        min_keep: measure removals from the last block down to this many experts (``None``: no ladder).

    Returns:
        ``{"layers": {name: {"selected", "weight_sum", "mass": float64 tensors (R,), "tokens": int,
        "block_names", "block_sizes", "block_scales", "ladder": [Σ‖Y_full‖², Σ‖Y_1 − Y_full‖², ...] or None,
        "ladder_order": block-local removal order or None}}, "world_size": n, "allreduce_seconds": s,
        "allreduce_bytes": b}``. A ladder is ``None`` where the layer has none (router gate) or where some
        worker had no data to measure it on.
    """
    bare = _bare(model)
    forward = forward or model
    layers = mora_layers(bare)
    batches = list(batches)
    world = world_size()
    if check_lockstep and world > 1 and _partitioned(bare):
        n = torch.tensor([len(batches), -len(batches)], dtype=torch.long)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        if n[0] != -n[1]:
            raise ValueError(f"statistics batches differ across workers (between {-int(n[1])} and {int(n[0])}); "
                             "under ZeRO-3 every worker must run the same number of forwards")
    was_training = bare.training
    bare.eval()
    for layer in layers.values():
        layer.start_stats(ladder_min_keep=min_keep)
    try:
        for batch in batches:
            mask = batch["attention_mask"]
            for layer in layers.values():
                layer.stats_token_mask = mask
            device = next(iter(layers.values())).mora_scale.device
            forward(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device))
        local = {name: layer.stop_stats() for name, layer in layers.items()}
    finally:
        for layer in layers.values():
            layer.stats = None
            layer.stats_token_mask = None
        bare.train(was_training)
    # one all-reduce for the whole task: every layer's sums flattened into one tensor; a ladder also carries
    # the number of workers that measured it (all of them, or it is not used)
    parts = []
    for n in layers:
        e = local[n]
        parts += [e[k] for k in SUM_KEYS] + [e["tokens"]]
        if "ladder" in e:
            measured = 1.0 if e["ladder_order"] is not None else 0.0
            parts += [e["ladder"], torch.tensor([measured], dtype=torch.float64, device=e["ladder"].device)]
    flat = torch.cat(parts)
    t0 = time.perf_counter()
    if world > 1:
        dist.all_reduce(flat)
    seconds = time.perf_counter() - t0
    flat = flat.cpu()
    out, offset = {}, 0
    for name, layer in layers.items():
        R = layer.num_experts
        entry = {}
        for key in SUM_KEYS:
            entry[key] = flat[offset:offset + R].clone()
            offset += R
        entry["tokens"] = int(flat[offset].item())
        offset += 1
        entry["ladder"] = entry["ladder_order"] = None
        if "ladder" in local[name]:
            size = local[name]["ladder"].numel()
            ladder = flat[offset:offset + size].tolist()
            complete = int(round(flat[offset + size].item())) == world
            offset += size + 1
            if complete:
                entry["ladder"], entry["ladder_order"] = ladder, list(local[name]["ladder_order"])
        entry.update(block_names=list(layer.block_names), block_sizes=list(layer.block_sizes),
                     block_scales=list(layer.block_scales))
        out[name] = entry
    return {"layers": out, "world_size": world, "allreduce_seconds": seconds, "allreduce_bytes": flat.numel() * 8}


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
def check_decision_agrees(decision: dict) -> list[str]:
    """Compare the decision's hash across workers; raise on every worker if any differs.

    Returns:
        The hashes of all workers (one entry in a single process).
    """
    digest = decision_hash(decision)
    if world_size() == 1:
        return [digest]
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(everyone, mine)
    hashes = [bytes(t.tolist()).hex() for t in everyone]
    if len(set(hashes)) != 1:
        raise RuntimeError(f"pruning decisions differ across workers ({hashes}); statistics were not combined "
                           "identically — refusing to change the bank")
    return hashes


def apply_pruning(model: nn.Module, decision: dict) -> int:
    """Remove the decided experts from every layer's bank (plain tensors; under ZeRO-3 use
    ``engine.prune``, which gathers first). Returns the number of experts removed."""
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


def statistics_record(stats: dict, decision: dict | None = None, task: str | None = None) -> dict:
    """A JSON-ready record: every expert of every block (routing telemetry) and the decision.

    Per block, besides the per-expert sums: ``weight_share`` (the block's share of all gate weight on this data)
    and ``weight_per_expert`` (that share divided by the block's experts), which separates routing from block
    size when blocks were pruned to different sizes."""
    layers = {}
    for name, e in stats["layers"].items():
        tokens, blocks, start = e["tokens"], [], 0
        all_weight = float(e["weight_sum"].sum())
        for bname, size, scale in zip(e["block_names"], e["block_sizes"], e["block_scales"]):
            sl = slice(start, start + size)
            mass = e["mass"][sl]
            total = float(mass.sum())
            share = float(e["weight_sum"][sl].sum()) / all_weight if all_weight > 0 else 0.0
            blocks.append({"name": bname, "size": size, "scale": scale,
                           "selected": [int(v) for v in e["selected"][sl].tolist()],
                           "usage": [v / tokens if tokens else 0.0 for v in e["selected"][sl].tolist()],
                           "weight_sum": e["weight_sum"][sl].tolist(), "mass": mass.tolist(),
                           "mass_share": [(v / total if total > 0 else 0.0) for v in mass.tolist()],
                           "weight_share": share, "weight_per_expert": share / size if size else 0.0})
            start += size
        layers[name] = {"tokens": tokens, "blocks": blocks, "ladder_sums": e.get("ladder")}
    return {"task": task, "world_size": stats.get("world_size", 1), "layers": layers, "decision": decision}


def expert_summary(record: dict) -> dict:
    """The report's view of a statistics record (``statistics_record``): per layer group (q_proj, ...),
    averaged over layers, each block's share of the gate weight on the task's data (``usage``) and that share
    per expert of the block (``usage_per_expert``: routing without the block size); the pruning counts and the
    distribution of the measured output changes of the layers that were pruned."""
    usage: dict[str, list[list[float]]] = {}
    per_expert: dict[str, list[list[float]]] = {}
    for lname, layer in record["layers"].items():
        group = lname.rsplit(".", 1)[-1]
        total = sum(sum(b["weight_sum"]) for b in layer["blocks"]) or 1.0
        shares = [sum(b["weight_sum"]) / total for b in layer["blocks"]]
        usage.setdefault(group, []).append(shares)
        per_expert.setdefault(group, []).append([sh / b["size"] if b["size"] else 0.0
                                                 for sh, b in zip(shares, layer["blocks"])])
    added = kept = 0
    changes = []
    for entry in record["decision"]["layers"].values():
        added += len(entry["remove"]) + len(entry["keep"])
        kept += len(entry["keep"])
        if entry["remove"] and entry.get("output_change") is not None:
            changes.append(float(entry["output_change"]))
    changes.sort()

    def mean(rows: dict) -> dict:
        return {g: [sum(col) / len(col) for col in zip(*r)] for g, r in rows.items()}

    first = next(iter(record["layers"].values()))
    summary = {"experts_added": added, "experts_kept": kept, "experts_pruned": added - kept,
               "tokens": first["tokens"], "layers_pruned": len(changes),
               "output_change_median": round(changes[len(changes) // 2], 5) if changes else 0.0,
               "output_change_max": round(changes[-1], 5) if changes else 0.0}
    return {"summary": summary, "usage": mean(usage), "usage_per_expert": mean(per_expert),
            "blocks": [b["name"] for b in first["blocks"]]}


def write_statistics(directory: str | os.PathLike, task: str, stats: dict, decision: dict | None = None) -> Path:
    """Write ``stats-<task>.json`` atomically into ``directory`` (rank 0 only; other ranks return the path)."""
    path = Path(directory) / f"stats-{task}.json"
    if dist.is_initialized() and dist.get_rank() != 0:
        return path
    atomic_write_json(path, statistics_record(stats, decision, task))
    return path
