"""Routing statistics of a task, combined over workers with one all-reduce, and the check that every worker
took the same pruning decision.

After a task is trained, ``collect_statistics`` runs forwards only, with inference gating (eval mode), over the
task's data and accumulates per layer and per expert: tokens on which the expert was selected, ``Σ w`` and the
contribution mass ``Σ |w z| · ‖B‖``, plus the token count (padding skipped) — the routing telemetry, kept for
every expert of every block. In the same forwards each layer measures the removal ladder of its new block
(``mora_dist.mora.removal``): per rung ``j`` (the first ``j`` experts of a fixed order removed, the pruned bank's
gate run again) ``Σ‖Y_j − Y_full‖²``, and once ``Σ‖Y_full‖²``.

All of it — usage sums and ladder sums of every layer — is flattened into one float64 tensor and all-reduced
**once** per task, so every worker holds the same global sums. The decision itself is a pure function of them
(``mora_dist.mora.pruning.decide_pruning``); ``check_decision_agrees`` compares its hash across workers. See
docs/design.md, Pruning and Distribution. Needs only ``torch.distributed``.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from mora_dist.base_model import takes_logits_to_keep
from mora_dist.distributed.bank import is_partitioned
from mora_dist.distributed.collectives import collective_device, max_over_ranks
from mora_dist.distributed.env import world_size
from mora_dist.mora import mora_layers
from mora_dist.mora.pruning import decision_hash

SUM_KEYS = ("selected", "weight_sum", "mass")


def _bare(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the model


@torch.no_grad()
def collect_statistics(model: nn.Module, batches: Iterable[dict], *, forward: Callable | None = None,
                       check_lockstep: bool = True, min_keep: int | None = 1) -> dict:
    """Per-layer, per-expert routing statistics and the removal ladder of ``batches``, summed over all workers.

    Args:
        model: the model with MoRA layers, or a DeepSpeed engine (then its forward is used, which under
            ZeRO-3 gathers parameters).
        batches: this worker's share of the data: dicts with ``input_ids`` and ``attention_mask``, optionally
            ``stats_mask`` (same shape): count only those tokens (default: the attention mask's).
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
    extra = {}
    if forward is None and takes_logits_to_keep(bare):
        extra["logits_to_keep"] = 1  # the statistics come from the MoRA layers: no vocabulary projection needed
    forward = forward or model
    layers = mora_layers(bare)
    batches = list(batches)
    world = world_size()
    if check_lockstep and world > 1 and any(is_partitioned(p) for p in bare.parameters()):
        most, neg_least = max_over_ranks([len(batches), -len(batches)])
        if most != -neg_least:
            raise ValueError(f"statistics batches differ across workers (between {-neg_least} and {most}); "
                             "under ZeRO-3 every worker must run the same number of forwards")
    was_training = bare.training
    bare.eval()
    for layer in layers.values():
        layer.start_stats(ladder_min_keep=min_keep)
    try:
        for batch in batches:
            mask = batch["attention_mask"]
            for layer in layers.values():
                layer.stats_token_mask = batch.get("stats_mask", mask)
            device = next(iter(layers.values())).mora_scale.device
            forward(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device), **extra)
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


def check_decision_agrees(decision: dict) -> list[str]:
    """Compare the decision's hash across workers; raise on every worker if any differs.

    Returns:
        The hashes of all workers (one entry in a single process).
    """
    digest = decision_hash(decision)
    if world_size() == 1:
        return [digest]
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=collective_device())
    everyone = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(everyone, mine)
    hashes = [bytes(t.cpu().tolist()).hex() for t in everyone]
    if len(set(hashes)) != 1:
        raise RuntimeError(f"pruning decisions differ across workers ({hashes}); statistics were not combined "
                           "identically — refusing to change the bank")
    return hashes


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


def layer_block_shares(layer: dict, field: str) -> list[float]:
    """Each block's share of ``field`` (``weight_sum``: gate weight, or ``mass``: contribution mass) in one layer
    of a statistics record (``statistics_record``); all zeros where the layer's sum is zero."""
    sums = [sum(b[field]) for b in layer["blocks"]]
    total = sum(sums) or 1.0
    return [s / total for s in sums]


def expert_summary(record: dict) -> dict:
    """The report's view of a statistics record (``statistics_record``): per layer group (q_proj, ...),
    averaged over layers, each block's share of the gate weight on the task's data (``usage``) and that share
    per expert of the block (``usage_per_expert``: routing without the block size); the pruning counts and the
    distribution of the measured output changes of the layers that were pruned."""
    usage: dict[str, list[list[float]]] = {}
    per_expert: dict[str, list[list[float]]] = {}
    for lname, layer in record["layers"].items():
        group = lname.rsplit(".", 1)[-1]
        shares = layer_block_shares(layer, "weight_sum")
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
