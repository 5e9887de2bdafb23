"""Pruning rules measured on a real stream: experts removed per task and the adapter-output change it causes.

    python bench/pruning_rules.py configs/quickstart.yaml --rule bounded [key.sub=value ...]
    python bench/pruning_rules.py configs/quickstart.yaml --rule thresholds mora.grad=sparse [...]

Runs the stream with ``mora-dist run`` in this process (the run directory of the config, so give each rule its own
``run_dir=...``) and measures, at every task's pruning decision, each layer's relative change of its adapter
output ``‖Y_pruned − Y_full‖_F / ‖Y_full‖_F`` over the statistics tokens. The measurement is this script's own:
a second forward over the same statistics batches with hooks that run both banks (full and pruned) in float64
on each layer's real inputs. Rules:

* ``bounded``: the shipped rule (``prune.max_output_change``, measured removal ladder);
* ``thresholds``: the rule the project used before — remove an expert of the new block when its usage (share of
  tokens selecting it) is below ``--min-usage`` or its share of the block's contribution mass is below
  ``--min-mass-share``, keeping at least ``prune.min_keep`` (the strongest by mass).

Prints a table and writes ``bench/results/pruning_<label>.json`` (``--label``, default the rule).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mora_dist.distributed import stats as S  # noqa: E402
from mora_dist.mora import mora_layers  # noqa: E402
from mora_dist.mora import pruning as P  # noqa: E402


def threshold_decision(stats: dict, prune_cfg, min_usage: float, min_mass_share: float) -> dict:
    """The earlier usage / mass-share rule, on the same all-reduced statistics."""
    layers_out = {}
    for name, e in stats["layers"].items():
        sizes = e["block_sizes"]
        b = len(sizes) - 1
        start, size = sum(sizes[:b]), sizes[b]
        usage = e["selected"][start:start + size] / max(e["tokens"], 1)
        mass = e["mass"][start:start + size]
        total = float(mass.sum())
        share = mass / total if total > 0 else torch.zeros_like(mass)
        drop = {i for i in range(size) if usage[i] < min_usage or share[i] < min_mass_share}
        keep_min = min(prune_cfg.min_keep, size)
        if size - len(drop) < keep_min:
            drop -= set(sorted(range(size), key=lambda i: (-float(mass[i]), i))[:keep_min])
        layers_out[name] = {"remove": sorted(drop), "keep": [i for i in range(size) if i not in drop]}
    first = next(iter(stats["layers"].values()))
    decision = {"block": len(first["block_sizes"]) - 1, "block_name": first["block_names"][-1],
                "rule": {"thresholds": [min_usage, min_mass_share], "min_keep": prune_cfg.min_keep},
                "layers": layers_out}
    decision["hash"] = P.decision_hash(decision)
    return decision


def _adapter_out(layer, x, A, B, scale):
    z = x @ A.T
    s = z / z.norm(dim=-1, keepdim=True).clamp_min(layer.eps)
    kept, idx = s.topk(min(layer.k, s.shape[-1]), dim=-1)
    w = torch.zeros_like(s).scatter(-1, idx, torch.softmax(kept / layer.tau, dim=-1))
    if layer.delta is not None:  # the statistics pass runs in eval mode, where the threshold applies
        w = w * (s >= layer.delta)
    return (scale * w * z) @ B.T


@torch.no_grad()
def measure(model, batches: list[dict], decision: dict) -> dict[str, float]:
    """Relative adapter-output change per layer of the decision's removals, over ``batches``."""
    layers = mora_layers(model)
    sums = {n: [0.0, 0.0] for n in layers}
    masks: list[torch.Tensor] = []

    def hook(name, layer):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[masks[-1]].double()
            A, B = (t.double() for t in layer.bank())
            scale = layer.mora_scale.double()
            start = A.shape[0] - layer.block_sizes[-1]
            keep = torch.ones(A.shape[0], dtype=torch.bool)
            keep[[start + i for i in decision["layers"][name]["remove"]]] = False
            full = _adapter_out(layer, x, A, B, scale)
            diff = _adapter_out(layer, x, A[keep], B[:, keep], scale[keep]) - full if not keep.all() else 0 * full
            sums[name][0] += float((diff ** 2).sum())
            sums[name][1] += float((full ** 2).sum())
        return fn

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in layers.items()]
    model.eval()
    try:
        for b in batches:
            masks.append(b["attention_mask"].reshape(-1).bool())
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return {n: (num / den) ** 0.5 if num > 0 else 0.0 for n, (num, den) in sums.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--rule", choices=("bounded", "thresholds"), required=True)
    p.add_argument("--min-usage", type=float, default=0.01)
    p.add_argument("--min-mass-share", type=float, default=0.01)
    p.add_argument("--label")
    args, overrides = p.parse_known_args(argv)
    tasks: list[dict] = []
    seen: dict = {}
    real_collect, real_decide = S.collect_statistics, P.decide_pruning

    def collect(model, batches, **kw):
        seen["model"], seen["batches"] = getattr(model, "module", model), list(batches)
        return real_collect(model, seen["batches"], **kw)

    def decide(stats, model, prune_cfg):
        if args.rule == "bounded":
            decision = real_decide(stats, model, prune_cfg)
        else:
            decision = threshold_decision(stats, prune_cfg, args.min_usage, args.min_mass_share)
        changes = measure(seen["model"], seen["batches"], decision)
        sizes = {n: len(e["remove"]) + len(e["keep"]) for n, e in decision["layers"].items()}
        pruned = {n: len(e["remove"]) for n, e in decision["layers"].items()}
        touched = [changes[n] for n in changes if pruned[n]]
        recorded = [(changes[n], decision["layers"][n].get("output_change")) for n in changes if pruned[n]]
        tasks.append({
            "task": decision["block_name"], "experts_added": sum(sizes.values()), "experts_pruned": sum(pruned.values()),
            "fraction_pruned": sum(pruned.values()) / max(sum(sizes.values()), 1),
            "layers": len(sizes), "layers_pruned": len(touched),
            "change_pruned_layers": {"median": statistics.median(touched) if touched else 0.0,
                                     "max": max(touched, default=0.0)},
            "change_all_layers_mean": sum(changes.values()) / len(changes),
            "max_gap_to_recorded": max((abs(a - b) for a, b in recorded if b is not None), default=None),
            "per_layer": {n: {"removed": pruned[n], "change": changes[n]} for n in changes}})
        t = tasks[-1]
        print(f"[pruning] {t['task']}: pruned {t['experts_pruned']}/{t['experts_added']} "
              f"({100 * t['fraction_pruned']:.1f} %), layers pruned {t['layers_pruned']}/{t['layers']}, "
              f"change on pruned layers median {100 * t['change_pruned_layers']['median']:.2f} % "
              f"max {100 * t['change_pruned_layers']['max']:.2f} %", flush=True)
        return decision

    S.collect_statistics, P.decide_pruning = collect, decide
    from mora_dist.cli import main as cli_main

    rc = cli_main(["run", args.config, *overrides])
    label = args.label or args.rule
    out = ROOT / "bench" / "results" / f"pruning_{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": args.config, "overrides": overrides, "rule": args.rule,
              "thresholds": [args.min_usage, args.min_mass_share] if args.rule == "thresholds" else None,
              "tasks": tasks, "exit_code": rc}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "tasks"}))
    print(f"wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
