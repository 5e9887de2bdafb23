"""Routing statistics of a task, combined over workers with one all-reduce, and rank pruning (DESIGN §2).

After a task is trained, ``collect_statistics`` runs forwards only, with inference gating (eval mode), over the
task's data and accumulates per layer and per expert: tokens on which the expert was selected, ``Σ w`` and the
contribution mass ``Σ |w z| · ‖B‖``, plus the token count (padding skipped). All layers' sums are flattened into
one float64 tensor and all-reduced once, so every worker holds the same global statistics. ``decide_pruning``
is a pure function of those statistics, hence identical on every worker; ``check_decision_agrees`` proves it by
comparing a hash. Needs only ``torch.distributed``.
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

from mora_dist.io import atomic_write_json
from mora_dist.mora import mora_layers

SUM_KEYS = ("selected", "weight_sum", "mass")


def _bare(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the model


def _partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@torch.no_grad()
def collect_statistics(model: nn.Module, batches: Iterable[dict], *, forward: Callable | None = None,
                       check_lockstep: bool = True) -> dict:
    """Per-layer, per-expert routing statistics of ``batches``, summed over all workers.

    Args:
        model: the model with MoRA layers, or a DeepSpeed engine (then its forward is used, which under
            ZeRO-3 gathers parameters).
        batches: this worker's share of the data: dicts with ``input_ids`` and ``attention_mask``.
        forward: called as ``forward(input_ids=..., attention_mask=...)``; default ``model``.
        check_lockstep: under ZeRO-3 first check that every worker has the same number of batches (a mismatch
            would deadlock in the parameter gathers); raises ``ValueError`` on every worker instead.

    Returns:
        ``{"layers": {name: {"selected", "weight_sum", "mass": float64 tensors (R,), "tokens": int,
        "block_names", "block_sizes", "block_scales"}}, "world_size": n, "allreduce_seconds": s,
        "allreduce_bytes": b}``.
    """
    bare = _bare(model)
    forward = forward or model
    layers = mora_layers(bare)
    batches = list(batches)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if check_lockstep and world > 1 and _partitioned(bare):
        n = torch.tensor([len(batches), -len(batches)], dtype=torch.long)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        if n[0] != -n[1]:
            raise ValueError(f"statistics batches differ across workers (between {-int(n[1])} and {int(n[0])}); "
                             "under ZeRO-3 every worker must run the same number of forwards")
    was_training = bare.training
    bare.eval()
    for layer in layers.values():
        layer.start_stats()
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
    # one all-reduce for the whole task: every layer's sums flattened into one tensor
    flat = torch.cat([torch.cat([local[n][k] for k in SUM_KEYS] + [local[n]["tokens"]]) for n in layers])
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
        entry.update(block_names=list(layer.block_names), block_sizes=list(layer.block_sizes),
                     block_scales=list(layer.block_scales))
        out[name] = entry
    return {"layers": out, "world_size": world, "allreduce_seconds": seconds, "allreduce_bytes": flat.numel() * 8}


def decide_pruning(stats: dict, model: nn.Module | None, prune_cfg, block: int = -1) -> dict:
    """Which experts of the new (last) block to remove, per layer; a pure function of the statistics.

    ``model`` (optional) is checked to have the banks the statistics were taken on.

    An expert is removed when its usage (share of tokens that selected it) is below ``prune_cfg.min_usage``
    or its share of the block's contribution mass is below ``prune_cfg.min_mass_share``; at least
    ``prune_cfg.min_keep`` experts stay (the strongest by mass, ties to the lower index). Nothing is removed
    when pruning is disabled or a layer saw no tokens.

    Returns:
        ``{"block": index, "block_name": str, "thresholds": {...}, "layers": {name: {"remove": [...],
        "keep": [...]}}, "hash": sha256 of the canonical decision}`` (indices local to the block).
    """
    if model is not None:
        layers = mora_layers(_bare(model))
        for name, entry in stats["layers"].items():
            if name not in layers or list(layers[name].block_sizes) != entry["block_sizes"]:
                raise ValueError(f"statistics of layer {name} (blocks {entry['block_sizes']}) do not match the "
                                 "model's bank; collect them again after the last bank change")
    layers_out = {}
    block_index = block_name = None
    for name, entry in stats["layers"].items():
        sizes = entry["block_sizes"]
        if not sizes:
            continue
        b = block % len(sizes)
        block_index, block_name = b, entry["block_names"][b]
        start, size = sum(sizes[:b]), sizes[b]
        tokens = entry["tokens"]
        if not prune_cfg.enabled or tokens == 0 or size == 0:
            layers_out[name] = {"remove": [], "keep": list(range(size))}
            continue
        usage = entry["selected"][start:start + size] / tokens
        mass = entry["mass"][start:start + size]
        total = float(mass.sum())
        share = mass / total if total > 0 else torch.zeros_like(mass)
        drop = {i for i in range(size) if usage[i] < prune_cfg.min_usage or share[i] < prune_cfg.min_mass_share}
        keep_min = min(prune_cfg.min_keep, size)
        if size - len(drop) < keep_min:
            strongest = sorted(range(size), key=lambda i: (-float(mass[i]), i))[:keep_min]
            drop -= set(strongest)
        layers_out[name] = {"remove": sorted(drop), "keep": [i for i in range(size) if i not in drop]}
    decision = {"block": block_index, "block_name": block_name,
                "thresholds": {"enabled": bool(prune_cfg.enabled), "min_usage": float(prune_cfg.min_usage),
                               "min_mass_share": float(prune_cfg.min_mass_share),
                               "min_keep": int(prune_cfg.min_keep)},
                "layers": layers_out}
    decision["hash"] = decision_hash(decision)
    return decision


def decision_hash(decision: dict) -> str:
    """sha256 of the canonical JSON of a decision (without its ``hash`` field)."""
    body = {k: v for k, v in decision.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_decision_agrees(decision: dict) -> list[str]:
    """Compare the decision's hash across workers; raise on every worker if any differs.

    Returns:
        The hashes of all workers (one entry in a single process).
    """
    digest = decision_hash(decision)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [digest]
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
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
    """A JSON-ready record: every expert of every block (routing telemetry) and the decision."""
    layers = {}
    for name, e in stats["layers"].items():
        tokens, blocks, start = e["tokens"], [], 0
        for bname, size, scale in zip(e["block_names"], e["block_sizes"], e["block_scales"]):
            sl = slice(start, start + size)
            mass = e["mass"][sl]
            total = float(mass.sum())
            blocks.append({"name": bname, "size": size, "scale": scale,
                           "selected": [int(v) for v in e["selected"][sl].tolist()],
                           "usage": [v / tokens if tokens else 0.0 for v in e["selected"][sl].tolist()],
                           "weight_sum": e["weight_sum"][sl].tolist(), "mass": mass.tolist(),
                           "mass_share": [(v / total if total > 0 else 0.0) for v in mass.tolist()]})
            start += size
        layers[name] = {"tokens": tokens, "blocks": blocks}
    return {"task": task, "world_size": stats.get("world_size", 1), "layers": layers, "decision": decision}


def write_statistics(directory: str | os.PathLike, task: str, stats: dict, decision: dict | None = None) -> Path:
    """Write ``stats-<task>.json`` atomically into ``directory`` (rank 0 only; other ranks return the path)."""
    path = Path(directory) / f"stats-{task}.json"
    if dist.is_initialized() and dist.get_rank() != 0:
        return path
    atomic_write_json(path, statistics_record(stats, decision, task))
    return path
